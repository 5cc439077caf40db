"""keras-sd: Stable Diffusion in Keras 3.

Example:
>>> import keras_sd
>>> sd = keras_sd.StableDiffusion(64, 64, config="tiny")
>>> sd.text_to_image("a red circle", num_steps=2, seed=0).shape
(1, 64, 64, 3)
"""

import importlib

__version__ = "0.1.0"

# Public names and the modules defining them, imported on first use: `import keras_sd`
# (and so the `keras-sd` command's start, argument errors and --help) does not import
# Keras and its backend until something needs them.
_EXPORTS = {
    "CLIPTextEncoder": "keras_sd.models.clip_text",
    "CheckpointError": "keras_sd.weights.state_dict",
    "CLIPTokenizer": "keras_sd.tokenizer",
    "DDIMScheduler": "keras_sd.schedulers",
    "StableDiffusion": "keras_sd.pipeline",
    "UNet": "keras_sd.models.unet",
    "VAEDecoder": "keras_sd.models.vae",
    "VAEEncoder": "keras_sd.models.vae",
    "export_components": "keras_sd.weights.diffusers",
    "load_components": "keras_sd.weights.diffusers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("__"):
        try:  # a submodule, e.g. `keras_sd.backend` after only `import keras_sd`
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
