"""Single-file keras-sd bundles: every component's weights plus the model config.

One `.safetensors` file holds the diffusers-layout state dicts under the prefixes
"unet.", "vae." and "text_encoder."; its metadata holds the model configuration (JSON,
the `config` dict of `StableDiffusion`), the default image size and the tokenizer's
added tokens. The bundled tiny-shapes model uses this format.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import keras
import numpy as np
from safetensors.numpy import save_file

from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.weights.diffusers import export_components, load_components
from keras_sd.weights.safetensors_io import read_safetensors

FORMAT = "keras_sd.bundle"
VERSION = "1"
COMPONENT_PREFIXES = ("unet", "vae", "text_encoder")
_DTYPES = ("float16", "bfloat16", "float32")


def save_bundle(sd, path, dtype: str = "float16") -> None:
    """Write all weights and the config of a `StableDiffusion` to one safetensors file.

    Args:
        sd: a `StableDiffusion`.
        path: the file to write (conventionally `*.safetensors`).
        dtype: storage precision of the weights, "float16" (half the size) or "float32".

    Example:
    >>> save_bundle(sd, "tiny-shapes.safetensors")  # doctest: +SKIP
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32'; received {dtype!r}.")
    tensors = {}
    for component, state in export_components(sd).items():
        for key, value in state.items():
            tensors[f"{component}.{key}"] = np.ascontiguousarray(value, dtype=dtype)
    save_file(tensors, os.fspath(path), metadata=pipeline_metadata(sd, FORMAT, VERSION))


def pipeline_metadata(sd, format_name: str, version: str) -> dict:
    """The safetensors metadata that rebuilds `sd` around its weights: format tag and
    version, model config (JSON), default image size and the tokenizer's added tokens.

    Example:
    >>> pipeline_metadata(sd, FORMAT, VERSION)["img_width"]  # doctest: +SKIP
    '64'
    """
    config = dict(sd.config)
    config["tokenizer"] = {k: v for k, v in config["tokenizer"].items() if k != "added_tokens"}
    return {
        "format": format_name,
        "version": version,
        "config": json.dumps(config),
        "img_width": str(sd.img_width),
        "img_height": str(sd.img_height),
        "added_tokens": json.dumps(sd.tokenizer.added_tokens),
    }


def read_pipeline_metadata(metadata: dict) -> tuple[dict, int, int]:
    """`(config, img_width, img_height)` from `pipeline_metadata`'s entries; the added
    tokens go back into the tokenizer's config (only when there are any).

    Example:
    >>> entries = {"config": '{"tokenizer": {}}', "img_width": "64", "img_height": "32",
    ...            "added_tokens": '["<cat-toy>"]'}
    >>> read_pipeline_metadata(entries)
    ({'tokenizer': {'added_tokens': ['<cat-toy>']}}, 64, 32)
    """
    config = json.loads(metadata["config"])
    added = json.loads(metadata.get("added_tokens", "[]"))
    if added:
        config["tokenizer"]["added_tokens"] = added
    return config, int(metadata["img_width"]), int(metadata["img_height"])


def read_bundle(path) -> tuple[dict, dict]:
    """(metadata, {component: state dict}) of a bundle file, weights as stored.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: naming the file, when it is not a readable keras-sd bundle.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No keras-sd bundle at {path!r}.")
    try:
        tensors, metadata = read_safetensors(path)
        states = {name: {} for name in COMPONENT_PREFIXES}
        for key in sorted(tensors):
            component, _, name = key.partition(".")
            if component not in states:
                raise ValueError(f"unexpected tensor {key!r}")
            states[component][name] = tensors[key].read()
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path!r} is not a readable keras-sd bundle (corrupt or truncated?): {err}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is a safetensors file but not a keras-sd bundle "
            f"(metadata format={metadata.get('format')!r}, expected {FORMAT!r})."
        )
    return metadata, states


def is_bundle(path) -> bool:
    """Whether `path` is a bundle file (reads the header only)."""
    if not os.path.isfile(path):
        return False
    try:
        return read_safetensors(path)[1].get("format") == FORMAT
    except (OSError, ValueError):
        return False


def bundle_kwargs(
    path, *, prediction_type: str | None = None, img_width=None, img_height=None
) -> dict:
    """The `StableDiffusion(...)` arguments saved by `save_bundle`: config, image size
    and components with the bundle's weights.

    Weights are cast to the variable dtype of the global Keras dtype policy (float32
    unless a float16/bfloat16 policy is active).

    Args:
        path: a bundle file.
        prediction_type: overrides the stored scheduler's prediction type.
        img_width, img_height: default image size; default the stored one.

    Example:
    >>> sd = StableDiffusion(**bundle_kwargs("tiny-shapes.safetensors"))  # doctest: +SKIP
    """
    metadata, states = read_bundle(path)
    config, width, height = read_pipeline_metadata(metadata)
    if prediction_type is not None:
        config["scheduler"] = {**config["scheduler"], "prediction_type": prediction_type}
    dtype = keras.mixed_precision.global_policy().variable_dtype
    if dtype not in _DTYPES:
        dtype = "float32"
    states = {
        name: {k: v.astype(dtype) for k, v in state.items()} for name, state in states.items()
    }
    models = {
        "text_encoder": CLIPTextEncoder(**config["text_encoder"]),
        "diffusion_model": UNet(**config["unet"]),
        "decoder": VAEDecoder(**config["vae"]),
        "image_encoder": VAEEncoder(**config["vae"]),
    }
    load_components(SimpleNamespace(**models), **states)
    return {
        "config": config,
        "img_width": img_width or width,
        "img_height": img_height or height,
        **models,
    }
