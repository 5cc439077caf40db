"""Key maps between single-file CompVis/LDM checkpoints and the diffusers/transformers layout.

Single-file SD checkpoints keep the names of the original latent-diffusion code:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and either
`cond_stage_model.transformer.*` (SD 1.x, a transformers CLIPTextModel) or
`cond_stage_model.model.*` (SD 2.x, an OpenCLIP text tower). keras-sd models are
named after the diffusers/transformers modules, so these pure dict-to-dict
functions are the bridge. Values pass through untouched (numpy arrays or torch
tensors alike) except where the layouts differ: the VAE mid-block attention
(1x1 convs in CompVis, linear layers in diffusers) and the OpenCLIP fused
q/k/v projection.

Structure (number of resolution levels, resnets per level, where the
upsamplers sit) is read off the keys themselves, so any UNet/VAE config works.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

from keras_sd.weights.compvis_groups import (
    Groups,
    indices,
    invert,
    map_keys,
    translate,
    unet_groups_from_compvis,
    unet_groups_from_diffusers,
    vae_groups,
    vae_structure,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
_TEXT_PREFIX = "text_model."

# Checkpoint entries that are not weights of the three inference models; they are
# returned under "unused" without a warning.
_SCHEDULE_BUFFERS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
    "scale_factor",
}
_KNOWN_UNUSED = (EMA_PREFIX, VAE_PREFIX + "loss.")
# OpenCLIP parts SD 2.x does not use: the contrastive head and the causal mask buffer.
_OPENCLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}

_OPENCLIP_TOP = {
    "positional_embedding": "embeddings.position_embedding.weight",
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")

# The VAE attention weights stored as 1x1 convs in CompVis and as linear layers in diffusers.
_VAE_ATTENTION_MATRIX = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _ema_key(key: str) -> str:
    # LitEma stores `model.diffusion_model.a.b.weight` as `model_ema.diffusion_modelabweight`.
    return EMA_PREFIX + "".join(key.split(".")[1:])


def _openclip_to_diffusers(text: dict) -> tuple[dict, list[str], list[str]]:
    """OpenCLIP tower (prefix stripped) -> (`text_model.*` dict, unused keys, unknown keys)."""
    out, unused, unknown = {}, [], []
    blocks = indices(text, r"transformer\.resblocks\.(\d+)\.")
    # Released SD 2.x files hold the whole OpenCLIP tower (text_projection included) but
    # use the penultimate layer's output, so the last block is dead weight and the
    # diffusers text encoder has one layer fewer. Files we write have neither.
    last = max(blocks) if "text_projection" in text and blocks else None
    block_groups: Groups = {
        f"transformer.resblocks.{i}": (f"encoder.layers.{i}", _OPENCLIP_BLOCK) for i in blocks
    }
    in_proj = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
    for key, value in text.items():
        if key in _OPENCLIP_TOP:
            out[_TEXT_PREFIX + _OPENCLIP_TOP[key]] = value
        elif key in _OPENCLIP_UNUSED or key.startswith(f"transformer.resblocks.{last}."):
            unused.append(key)
        elif match := in_proj.match(key):
            layer, param = match.groups()
            width = value.shape[0] // 3  # rows are [q; k; v]
            for n, name in enumerate(_QKV):
                out[f"{_TEXT_PREFIX}encoder.layers.{layer}.self_attn.{name}.{param}"] = value[
                    n * width : (n + 1) * width
                ]
        elif (target := translate(key, block_groups)) is not None:
            out[_TEXT_PREFIX + target] = value
        else:
            unknown.append(key)
    return out, unused, unknown


def _diffusers_to_openclip(text: dict) -> dict:
    out = {}
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    layers = indices(text, rf"{re.escape(_TEXT_PREFIX)}encoder\.layers\.(\d+)\.")
    block_groups = invert(
        {f"transformer.resblocks.{i}": (f"encoder.layers.{i}", _OPENCLIP_BLOCK) for i in layers}
    )
    qkv = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
    unknown = []
    for key in text:
        name = key[len(_TEXT_PREFIX) :] if key.startswith(_TEXT_PREFIX) else None
        if name is None or name == "embeddings.position_ids":
            # position_ids is a constant buffer that OpenCLIP does not store.
            if name is None:
                unknown.append(key)
        elif name in top:
            out[top[name]] = text[key]
        elif match := qkv.match(name):
            layer, which, param = match.groups()
            if which == "q":
                parts = [
                    np.asarray(text[f"{_TEXT_PREFIX}encoder.layers.{layer}.self_attn.{p}.{param}"])
                    for p in _QKV
                ]
                out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = np.concatenate(parts)
        elif (target := translate(name, block_groups)) is not None:
            out[target] = text[key]
        else:
            unknown.append(key)
    _raise_unknown("text_encoder", unknown)
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


def _raise_unknown(component: str, keys: list[str]) -> None:
    if keys:
        shown = ", ".join(sorted(keys)[:8])
        raise ValueError(
            f"{len(keys)} {component} keys have no CompVis equivalent: {shown}"
            + (" ..." if len(keys) > 8 else "")
        )


def compvis_to_diffusers(state_dict: dict, use_ema: bool = False) -> dict[str, dict]:
    """Split a single-file CompVis/LDM SD checkpoint into diffusers-layout components.

    Args:
        state_dict: the flat checkpoint (`model.diffusion_model.*`, `first_stage_model.*`,
            `cond_stage_model.*`, ...), values as numpy arrays or torch tensors.
        use_ema: take the UNet weights from the `model_ema.*` copy (raises if a weight
            has no EMA copy). By default `model_ema.*` entries are not used. Files
            released as "ema-only" already store the EMA weights under
            `model.diffusion_model.*` and need nothing special.

    Returns:
        `{"unet": ..., "vae": ..., "text_encoder": ..., "unused": ...}`: the UNet and VAE
        with diffusers keys, the text encoder with transformers keys (`text_model.*`;
        SD 2.x OpenCLIP towers are converted and lose their unused last block), and
        every entry that was not converted, under its original key (EMA copies,
        schedule buffers, OpenCLIP's `text_projection`, unknown keys). Unknown keys
        also raise a warning. Passing the result to `diffusers_to_compvis` restores
        the original checkpoint (with `use_ema=False`).

    Example:
    >>> parts = compvis_to_diffusers(load_state_dict_file("v1-5.safetensors"))  # doctest: +SKIP
    >>> parts["unet"]["conv_in.weight"].shape  # doctest: +SKIP
    (320, 4, 3, 3)
    """
    unet_sd = _strip(state_dict, UNET_PREFIX)
    ema_keys = set()
    if use_ema:
        ema_keys = {_ema_key(UNET_PREFIX + k) for k in unet_sd}
        missing = ema_keys - set(state_dict)
        if missing:
            raise ValueError(f"use_ema=True but {len(missing)} UNet weights have no EMA copy")
        unet_sd = {k: state_dict[_ema_key(UNET_PREFIX + k)] for k in unet_sd}
    unet, unknown_unet = map_keys(unet_sd, unet_groups_from_compvis(unet_sd) if unet_sd else {})

    vae_sd = _strip(state_dict, VAE_PREFIX)
    vae, unknown_vae = map_keys(vae_sd, vae_groups(*vae_structure(vae_sd, "down", "up", "block")))
    for key, value in vae.items():
        if _VAE_ATTENTION_MATRIX.search(key) and len(value.shape) == 4:
            vae[key] = value[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> linear [C, C]

    text_encoder = _strip(state_dict, CLIP_PREFIX)
    openclip, openclip_unused, unknown_openclip = _openclip_to_diffusers(
        _strip(state_dict, OPENCLIP_PREFIX)
    )
    text_encoder.update(openclip)

    unused_keys = [OPENCLIP_PREFIX + k for k in openclip_unused]
    unknown = [UNET_PREFIX + k for k in unknown_unet] + [VAE_PREFIX + k for k in unknown_vae]
    unknown += [OPENCLIP_PREFIX + k for k in unknown_openclip]
    converted = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX)
    unknown += [k for k in state_dict if not k.startswith(converted) and k not in ema_keys]
    unused_keys += [k for k in unknown if k in _SCHEDULE_BUFFERS or k.startswith(_KNOWN_UNUSED)]
    unknown = [k for k in unknown if k not in unused_keys]
    if unknown:
        warnings.warn(
            f"{len(unknown)} checkpoint keys belong to no known SD component and are returned "
            f"under 'unused': {', '.join(sorted(unknown)[:8])}"
            + (" ..." if len(unknown) > 8 else ""),
            stacklevel=2,
        )
    leftover = set(unused_keys + unknown)
    unused = {k: v for k, v in state_dict.items() if k in leftover}
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "unused": unused}


_COMPONENTS = ("unet", "vae", "text_encoder", "unused")


def diffusers_to_compvis(components: dict, text_encoder_layout: str = "sd1") -> dict:
    """Join diffusers-layout components into one CompVis/LDM single-file state dict.

    The exact inverse of `compvis_to_diffusers` on the keys it produces, so a round
    trip in either direction is lossless (entries under "unused" are written back
    as they are). The one exception: the constant `text_model.embeddings.position_ids`
    buffer, which the OpenCLIP layout does not store, is dropped with "sd2".

    Args:
        components: any of `{"unet", "vae", "text_encoder", "unused"}` mapped to state
            dicts (diffusers keys; `text_model.*` keys for the text encoder).
        text_encoder_layout: "sd1" writes `cond_stage_model.transformer.*` (transformers
            CLIP); "sd2" writes the OpenCLIP layout `cond_stage_model.model.*` with
            fused q/k/v. An SD 2.x text encoder has no `text_projection` and no final
            block, which the original LDM code would expect; load such files with a
            lenient loader (or keep the originals under "unused").

    Returns:
        The flat CompVis-layout state dict.

    Raises:
        ValueError: an unknown component or layout, a key with no CompVis equivalent,
            or an "unused" entry that collides with a converted key.

    Example:
    >>> flat = diffusers_to_compvis({"unet": unet_sd, "vae": vae_sd}, "sd1")  # doctest: +SKIP
    >>> "model.diffusion_model.input_blocks.0.0.weight" in flat  # doctest: +SKIP
    True
    """
    if text_encoder_layout not in ("sd1", "sd2"):
        raise ValueError(f"text_encoder_layout must be 'sd1' or 'sd2', got {text_encoder_layout!r}")
    extra = set(components) - set(_COMPONENTS)
    if extra:
        raise ValueError(f"unknown components {sorted(extra)}; expected some of {_COMPONENTS}")
    out = {}
    unet_sd = components.get("unet") or {}
    if unet_sd:
        unet, unknown = map_keys(unet_sd, invert(unet_groups_from_diffusers(unet_sd)))
        _raise_unknown("unet", unknown)
        out.update({UNET_PREFIX + k: v for k, v in unet.items()})

    vae_sd = components.get("vae") or {}
    structure = vae_structure(vae_sd, "down_blocks", "up_blocks", "resnets")
    groups = invert(vae_groups(*structure))
    _raise_unknown("vae", map_keys(vae_sd, groups)[1])
    for key, value in vae_sd.items():
        if _VAE_ATTENTION_MATRIX.search(key) and len(value.shape) == 2:
            value = value[:, :, None, None]  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[VAE_PREFIX + translate(key, groups)] = value

    text_sd = components.get("text_encoder") or {}
    if text_encoder_layout == "sd1":
        out.update({CLIP_PREFIX + k: v for k, v in text_sd.items()})
    else:
        out.update(_diffusers_to_openclip(text_sd))

    collisions = sorted(set(out) & set(components.get("unused") or {}))
    if collisions:
        raise ValueError(f"'unused' entries collide with converted keys: {collisions[:8]}")
    out.update(components.get("unused") or {})
    return out


def detect_variant(state_dict: dict) -> dict:
    """Describe the model stored in a CompVis/LDM single-file state dict.

    Args:
        state_dict: the flat checkpoint (values as numpy arrays or torch tensors).

    Returns:
        `{"version": "sd1" | "sd2", "unet_in_channels": int (4, or 9 for inpainting),
        "has_ema": bool, "dtype": str (of the UNet weights, e.g. "float16"),
        "context_dim": int | None, "linear_projection": bool}`. The version comes from
        the text encoder layout (from the transformer projections when there is none).
        The prediction type (epsilon or v) is not stored in the weights.

    Raises:
        ValueError: no `model.diffusion_model.*` keys.

    Example:
    >>> detect_variant(load_state_dict_file("v2-1_768-ema-pruned.safetensors"))  # doctest: +SKIP
    {'version': 'sd2', 'unet_in_channels': 4, 'has_ema': False, 'dtype': 'float32',
     'context_dim': 1024, 'linear_projection': True}
    """
    unet = _strip(state_dict, UNET_PREFIX)
    conv_in = unet.get("input_blocks.0.0.weight")
    if conv_in is None:
        raise ValueError(
            "not a CompVis Stable Diffusion checkpoint: no 'model.diffusion_model.input_blocks"
            f".0.0.weight' among its {len(state_dict)} keys"
        )
    context = [v for k, v in unet.items() if k.endswith(".attn2.to_k.weight")]
    proj_in = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    linear = bool(proj_in) and len(proj_in[0].shape) == 2
    if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict):
        version = "sd2"
    elif any(k.startswith(CLIP_PREFIX) for k in state_dict):
        version = "sd1"
    else:
        version = "sd2" if linear else "sd1"
    ema_buffers = (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")
    return {
        "version": version,
        "unet_in_channels": int(conv_in.shape[1]),
        "has_ema": any(k.startswith(EMA_PREFIX) and k not in ema_buffers for k in state_dict),
        "dtype": str(conv_in.dtype).removeprefix("torch."),
        "context_dim": int(context[0].shape[1]) if context else None,
        "linear_projection": linear,
    }


__all__ = ["compvis_to_diffusers", "detect_variant", "diffusers_to_compvis"]
