"""CompVis <-> diffusers key maps of the UNet and the VAE, as groups of module prefixes.

A group maps one module prefix to another (`input_blocks.1.0` -> `down_blocks.0.resnets.0`),
with the sub-module renames inside that block. The groups are built from the structure
(levels, resnets per level, where the upsamplers sit) read off the keys themselves, so any
UNet/VAE config works; `keras_sd.weights.compvis` applies them.
"""

from __future__ import annotations

import re

# Sub-module renames inside one block: CompVis name -> diffusers name.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_VAE_ATTENTION = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}

# A group maps one module prefix to another. Its renames (or None: pass the rest
# of the key through) say which sub-modules it may hold; anything else is unknown.
Groups = dict[str, tuple[str, "dict[str, str] | None"]]


def translate(key: str, groups: Groups) -> str | None:
    """`key` renamed by the group of its longest matching prefix; None if none holds it."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):  # longest matching prefix wins
        head = ".".join(parts[:n])
        if head not in groups:
            continue
        target, renames = groups[head]
        rest = ".".join(parts[n:])
        if renames is None:
            return f"{target}.{rest}"
        for old, new in renames.items():
            if rest.startswith(old + "."):
                return f"{target}.{new}{rest[len(old) :]}"
        return None
    return None


def invert(groups: Groups) -> Groups:
    """The groups of the opposite direction (diffusers -> CompVis)."""
    return {
        target: (source, None if renames is None else {v: k for k, v in renames.items()})
        for source, (target, renames) in groups.items()
    }


def indices(keys, pattern: str) -> set[int]:
    """The integers that `pattern`'s first group matches at the start of `keys`."""
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := regex.match(k))}


def _unet_groups(levels: int, per_level: int, upsampler_slot: list[int]) -> Groups:
    """CompVis -> diffusers UNet groups. `upsampler_slot[b]` is 2 when up level b has
    attentions (`output_blocks.i.2.conv`), else 1."""
    groups: Groups = {
        "time_embed.0": ("time_embedding.linear_1", None),
        "time_embed.2": ("time_embedding.linear_2", None),
        "input_blocks.0.0": ("conv_in", None),
        "middle_block.0": ("mid_block.resnets.0", _UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", None),
        "middle_block.2": ("mid_block.resnets.1", _UNET_RESNET),
        "out.0": ("conv_norm_out", None),
        "out.2": ("conv_out", None),
    }
    step = per_level + 1  # each level: its resnets, then a down/upsampler slot
    for b in range(levels):
        for j in range(per_level):
            i = 1 + b * step + j  # input block 0 is conv_in
            groups[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", _UNET_RESNET)
            groups[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", None)
        if b < levels - 1:
            i = 1 + b * step + per_level
            groups[f"input_blocks.{i}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", None)
        for j in range(step):  # up levels have one resnet more (the skip from the downsampler)
            i = b * step + j
            groups[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", _UNET_RESNET)
            groups[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", None)
        if b < levels - 1:
            i = b * step + per_level
            groups[f"output_blocks.{i}.{upsampler_slot[b]}.conv"] = (
                f"up_blocks.{b}.upsamplers.0.conv",
                None,
            )
    return groups


def unet_groups_from_compvis(keys) -> Groups:
    """CompVis -> diffusers UNet groups for the structure of CompVis `keys`."""
    found = indices(keys, r"input_blocks\.(\d+)\.")
    n_inputs = max(found, default=-1) + 1
    if len(found) != n_inputs:  # a block index with nothing below it is no layout
        raise ValueError(f"input block indices {sorted(found)[:8]}... are not 0, 1, 2, ...")
    levels = len(indices(keys, r"input_blocks\.(\d+)\.0\.op\.")) + 1
    per_level = n_inputs // levels - 1
    if per_level < 1 or n_inputs != levels * (per_level + 1):
        raise ValueError(f"unrecognized CompVis UNet layout ({n_inputs} input blocks)")
    slots = [
        2 if f"output_blocks.{b * (per_level + 1) + per_level}.2.conv.weight" in keys else 1
        for b in range(levels)
    ]
    return _unet_groups(levels, per_level, slots)


def unet_groups_from_diffusers(keys) -> Groups:
    """CompVis -> diffusers UNet groups for the structure of diffusers `keys`."""
    levels = len(indices(keys, r"down_blocks\.(\d+)\."))
    per_level = len(indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    slots = [
        2 if any(k.startswith(f"up_blocks.{b}.attentions.") for k in keys) else 1
        for b in range(levels)
    ]
    return _unet_groups(levels, per_level, slots)


def vae_groups(levels: int, per_level: int) -> Groups:
    """CompVis -> diffusers VAE groups; the decoder counts its levels in reverse."""
    groups: Groups = {
        "quant_conv": ("quant_conv", None),
        "post_quant_conv": ("post_quant_conv", None),
    }
    for part in ("encoder", "decoder"):
        groups[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        groups[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        groups[f"{part}.norm_out"] = (f"{part}.conv_norm_out", None)
        groups[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", _VAE_RESNET)
        groups[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", _VAE_RESNET)
        groups[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", _VAE_ATTENTION)
    for i in range(levels):
        for j in range(per_level):
            groups[f"encoder.down.{i}.block.{j}"] = (
                f"encoder.down_blocks.{i}.resnets.{j}",
                _VAE_RESNET,
            )
        groups[f"encoder.down.{i}.downsample.conv"] = (
            f"encoder.down_blocks.{i}.downsamplers.0.conv",
            None,
        )
        up = levels - 1 - i
        for j in range(per_level + 1):
            groups[f"decoder.up.{i}.block.{j}"] = (
                f"decoder.up_blocks.{up}.resnets.{j}",
                _VAE_RESNET,
            )
        groups[f"decoder.up.{i}.upsample.conv"] = (
            f"decoder.up_blocks.{up}.upsamplers.0.conv",
            None,
        )
    return groups


def vae_structure(keys, down: str, up: str, block: str) -> tuple[int, int]:
    """(levels, resnets per encoder level) of a VAE, from keys named with `down`/`up`/`block`."""
    levels = len(indices(keys, rf"(?:encoder\.{down}|decoder\.{up})\.(\d+)\."))
    encoder_blocks = indices(keys, rf"encoder\.{down}\.0\.{block}\.(\d+)\.")
    decoder_blocks = indices(keys, rf"decoder\.{up}\.0\.{block}\.(\d+)\.")
    per_level = len(encoder_blocks) if encoder_blocks else len(decoder_blocks) - 1
    return levels, per_level


def map_keys(state_dict: dict, groups: Groups) -> tuple[dict, list[str]]:
    """(`state_dict` with translated keys, the keys no group holds)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        target = translate(key, groups)
        if target is None:
            unknown.append(key)
        else:
            out[target] = value
    return out, unknown
