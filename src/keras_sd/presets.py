"""Named model configurations (plain data).

A model configuration is a dict with one constructor-kwargs dict per component:
"tokenizer", "text_encoder", "unet", "vae", "scheduler".
"""

from __future__ import annotations

import copy

from keras_sd.models import clip_text, unet, vae

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
    return copy.deepcopy(config)


# Presets whose weights ship inside the package (offline).
BUNDLED_PRESETS = {"tiny-shapes": "tiny-shapes.safetensors"}


def bundled_preset_path(name: str) -> str:
    """Path of a bundled preset's weights file inside the installed package."""
    import importlib.resources

    if name not in BUNDLED_PRESETS:
        raise ValueError(f"{name!r} is not a bundled preset; bundled: {sorted(BUNDLED_PRESETS)}.")
    return str(importlib.resources.files("keras_sd") / "assets" / BUNDLED_PRESETS[name])


def preset_names() -> list[str]:
    """All preset names: bundled ones and those downloaded from a hub."""
    from keras_sd.weights import hub

    return sorted({*BUNDLED_PRESETS, *hub.PRESETS})
