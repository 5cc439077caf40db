"""diffusers pipeline folders on disk: `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.

Reading gives the components' state dicts (lazy for safetensors files) and a
keras-sd model configuration built from the json configs; writing produces a
folder that `diffusers.StableDiffusionPipeline.from_pretrained` loads offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from keras_sd import presets
from keras_sd.models import clip_text, unet, vae
from keras_sd.schedulers import registry
from keras_sd.weights.safe_pickle import load_state_dict_file
from keras_sd.weights.safetensors_io import (
    atomic_write_bytes,
    read_safetensors,
    write_safetensors,
)
from keras_sd.weights.state_dict import CheckpointError

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_TORCH_WEIGHT_FILES = {"text_encoder": "pytorch_model"}  # transformers' .bin name
_START, _END = "<|startoftext|>", "<|endoftext|>"


def read_weights_file(path: Path) -> dict:
    """A flat state dict from `.safetensors` (lazy) or a pickle-based file (safe unpickler)."""
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)[0]
    return load_state_dict_file(path)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}: a diffusers component folder needs it.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}.") from None


def _weight_file_names(name: str) -> list[str]:
    # A variant goes before the extension of a single file (`model.fp16.safetensors`)
    # but before `.json` in a shard index (`model.safetensors.index.fp16.json`).
    return [
        file
        for ext in ("safetensors", "bin")
        for variant in ("", ".fp16")
        for file in (f"{name}{variant}.{ext}", f"{name}.{ext}.index{variant}.json")
    ]


def _shard_names(index: Path) -> list[str]:
    """The shard files an index names, each a plain file name beside the index."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' of parameter names to shard files.")
    for shard in weight_map.values():
        # A shard name is data from the file: never let it reach outside the folder.
        if not isinstance(shard, str) or shard in ("", ".", "..") or re.search(r"[/\\:]", shard):
            raise CheckpointError(
                f"{index} names the shard {shard!r}; a shard must be a file name in the "
                "index's own folder (no path separators or '..')."
            )
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index} names the shard {shard}, which is missing.")
    return sorted(set(weight_map.values()))


def _component_weights(folder: Path, component: str) -> dict:
    names = [WEIGHT_FILES[component], _TORCH_WEIGHT_FILES.get(component)]
    candidates = [folder / file for name in names if name for file in _weight_file_names(name)]
    for path in candidates:
        if not path.is_file():
            continue
        if not path.name.endswith(".json"):
            return read_weights_file(path)
        state = {}
        for shard in _shard_names(path):
            state.update(read_weights_file(folder / shard))
        return state
    raise CheckpointError(
        f"{folder} holds no weights file; expected one of "
        f"{', '.join(p.name for p in candidates[:4])} (or a .bin or fp16 variant)."
    )


def read_folder(path: Path) -> tuple[dict, dict]:
    """`({component: state dict}, {component: parsed json})` of a diffusers folder.

    The configs hold "unet", "vae", "text_encoder" and, when present, "scheduler"
    and "tokenizer" (its `tokenizer_config.json`, plus `added_tokens.json` under
    the key "added_tokens_by_id").

    Raises:
        CheckpointError: a component folder, its config or its weights file is missing,
            a config asks for something keras-sd does not implement, or a shard index
            names a file outside its folder.
    """
    configs = {}
    for component in WEIGHT_FILES:
        if not (path / component).is_dir():
            raise CheckpointError(
                f"diffusers folder {path} has no '{component}' folder. A Stable Diffusion folder "
                "needs unet/, vae/ and text_encoder/, each with config.json and weights "
                "(scheduler/ and tokenizer/ are optional); for a single-file checkpoint pass "
                "the .safetensors or .ckpt file itself."
            )
        configs[component] = _read_json(path / component / "config.json")
    if (path / "scheduler" / "scheduler_config.json").is_file():
        configs["scheduler"] = _read_json(path / "scheduler" / "scheduler_config.json")
    tokenizer = path / "tokenizer"
    if (tokenizer / "tokenizer_config.json").is_file():
        configs["tokenizer"] = _read_json(tokenizer / "tokenizer_config.json")
        if (tokenizer / "added_tokens.json").is_file():
            configs["tokenizer"]["added_tokens_by_id"] = _read_json(tokenizer / "added_tokens.json")
    # Refuse what keras-sd cannot build before reading gigabytes of weights.
    model_config(configs, "sd1", str(path))
    states = {
        component: _component_weights(path / component, component) for component in WEIGHT_FILES
    }
    return states, configs


def _tokenizer_config(cfg: dict, base: dict) -> dict:
    # keras-sd always uses the CLIP vocabulary it bundles (SD 1.x and 2.x share it);
    # only the padding, length and added tokens come from the folder.
    pad = cfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    out = dict(base)
    if isinstance(pad, str):
        out["pad_token"] = pad
    if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < 10**6:
        out["max_length"] = cfg["model_max_length"]
    added = cfg.get("added_tokens_by_id")
    if added:
        out["added_tokens"] = sorted(added, key=added.get)
    return out


def model_config(configs: dict, base, source: str) -> tuple[dict, tuple[int, int] | None]:
    """A keras-sd model configuration from a folder's json configs, and its image size.

    Args:
        configs: the second result of `read_folder`.
        base: configuration name or dict for what the folder does not say (tokenizer
            and scheduler settings when those folders are absent).
        source: the folder, for error messages.

    Returns:
        `(config, (height, width))`: the UNet's `sample_size` (a number or `[h, w]`) in
        pixels, or `(config, None)` when the config has none.

    Raises:
        CheckpointError: a config asks for something keras-sd does not implement.
    """
    config = presets.resolve_model_config(base)
    try:
        config["unet"] = unet.config_from_diffusers(configs["unet"])
        config["vae"] = vae.config_from_diffusers(configs["vae"])
        config["text_encoder"] = clip_text.config_from_transformers(configs["text_encoder"])
        if "scheduler" in configs:
            config["scheduler"] = registry.config_from_diffusers(configs["scheduler"])
            registry.build_scheduler(config["scheduler"])  # refuses unsupported settings
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}.") from None
    if "tokenizer" in configs:
        config["tokenizer"] = _tokenizer_config(configs["tokenizer"], config["tokenizer"])
    return config, _image_size(configs["unet"].get("sample_size"), config, source)


def _image_size(sample, config: dict, source: str) -> tuple[int, int] | None:
    if sample is None:
        return None
    if isinstance(sample, int) and not isinstance(sample, bool):
        sample = [sample, sample]
    if (
        not isinstance(sample, (list, tuple))
        or len(sample) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sample)
    ):
        raise CheckpointError(
            f"{source}: unet sample_size must be a positive integer or [height, width]; "
            f"received {sample!r}."
        )
    factor = 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    return sample[0] * factor, sample[1] * factor


# ----------------------------------------------------------------------- writing
def _configs(sd, dtype: str) -> dict:
    u, v, t = (m.get_config() for m in (sd.diffusion_model, sd.decoder, sd.text_encoder))
    height, width = sd.img_height // sd.latent_factor, sd.img_width // sd.latent_factor
    scheduler = type(sd.scheduler).__name__  # diffusers uses the same class names
    return {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": height if height == width else [height, width],
            **{k: u[k] for k in ("in_channels", "out_channels", "block_out_channels")},
            **{k: u[k] for k in ("layers_per_block", "cross_attention_dim", "norm_num_groups")},
            **{k: u[k] for k in ("use_linear_projection", "upcast_attention", "norm_eps")},
            "transformer_layers_per_block": u["transformer_layers_per_block"],
            "down_block_types": [
                "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u["attention_levels"]
            ],
            "up_block_types": [
                "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in u["attention_levels"][::-1]
            ],
            # diffusers calls the head count `attention_head_dim` (see keras_sd.models.unet).
            "attention_head_dim": u["num_heads"],
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "sample_size": sd.img_height,
            **{k: v[k] for k in ("in_channels", "out_channels", "latent_channels")},
            **{k: v[k] for k in ("block_out_channels", "layers_per_block", "norm_num_groups")},
            "scaling_factor": v["scaling_factor"],
            "force_upcast": v.get("force_upcast", True),
            "down_block_types": ["DownEncoderBlock2D"] * len(v["block_out_channels"]),
            "up_block_types": ["UpDecoderBlock2D"] * len(v["block_out_channels"]),
        },
        "text_encoder": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": t["vocab_size"],
            "max_position_embeddings": t["max_length"],
            "hidden_size": t["hidden_dim"],
            "num_hidden_layers": t["num_layers"],
            "num_attention_heads": t["num_heads"],
            "intermediate_size": t["intermediate_dim"],
            "hidden_act": t["activation"],
            "layer_norm_eps": t["layer_norm_epsilon"],
            "bos_token_id": sd.tokenizer.start_token_id,
            "eos_token_id": sd.tokenizer.end_token_id,
            "pad_token_id": sd.tokenizer.pad_token_id,
            "torch_dtype": dtype,
        },
        "scheduler": {
            "_class_name": scheduler,
            **{k: v for k, v in sd.scheduler.get_config().items() if k != "eta"},
        },
        "model_index": {
            "_class_name": "StableDiffusionPipeline"
            if u["in_channels"] == u["out_channels"]
            else "StableDiffusionInpaintPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
    }


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _write_tokenizer(tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_vocabulary(folder)
    special = {"bos_token": _START, "eos_token": _END, "unk_token": _END}
    special["pad_token"] = tokenizer.pad_token
    _write_json(folder / "special_tokens_map.json", special)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length}
    _write_json(folder / "tokenizer_config.json", {**config, **special})
    if tokenizer.added_tokens:
        ids = tokenizer(tokenizer.added_tokens)[:, 1].tolist()  # [start, token, end, ...]
        added = dict(zip(tokenizer.added_tokens, ids, strict=True))
        _write_json(folder / "added_tokens.json", added)


def write_folder(sd, path: Path, parts: dict, dtype: str | None) -> None:
    """Write `sd` as a diffusers folder; `parts` are its diffusers-layout state dicts."""
    configs = _configs(sd, dtype or sd.diffusion_model.variable_dtype)
    for component, name in WEIGHT_FILES.items():
        folder = path / component
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "config.json", configs[component])
        write_safetensors(folder / f"{name}.safetensors", parts[component], dtype)
    (path / "scheduler").mkdir(exist_ok=True)
    _write_json(path / "scheduler" / "scheduler_config.json", configs["scheduler"])
    _write_tokenizer(sd.tokenizer, path / "tokenizer")
    _write_json(path / "model_index.json", configs["model_index"])
