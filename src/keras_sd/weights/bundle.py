"""Reading the single-file "bundles" that earlier keras-sd versions wrote.

keras-sd now has one single-file format of its own, the keras layout
(`keras_sd.weights.native`, `save_checkpoint(path, layout="keras")`); this module only
reads the older files. A bundle is a `.safetensors` file with the diffusers-layout state
dicts under the prefixes "unet.", "vae." and "text_encoder." and the same metadata as
the keras layout (format tag, model config, image size, added tokens).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from keras_sd.weights.deferred import MODELS, build_model
from keras_sd.weights.diffusers import TEXT_ENCODER_IGNORED, load_components
from keras_sd.weights.native import read_pipeline_metadata
from keras_sd.weights.safetensors_io import read_safetensors
from keras_sd.weights.state_dict import (
    CheckpointError,
    check_stored_weights,
    refusing,
    select_entries,
)

FORMAT = "keras_sd.bundle"
VERSION = "1"
COMPONENT_PREFIXES = ("unet", "vae", "text_encoder")


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
        raise CheckpointError(
            f"{path!r} is not a readable keras-sd bundle (corrupt or truncated?): {err}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
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
    path,
    *,
    prediction_type: str | None = None,
    img_width=None,
    img_height=None,
    policy: str | None = None,
) -> dict:
    """The `StableDiffusion(...)` arguments of a bundle file: config, image size
    and components with the bundle's weights.

    Weights are converted from the stored values to each variable's dtype.

    Args:
        path: a bundle file.
        prediction_type: overrides the stored scheduler's prediction type.
        img_width, img_height: default image size; default the stored one.
        policy: the models' dtype policy (`keras_sd.weights.precision.load_policy`);
            None: the global one.

    Example:
    >>> sd = StableDiffusion(**bundle_kwargs("tiny-shapes.safetensors"))  # doctest: +SKIP
    """
    metadata, states = read_bundle(path)
    with refusing(os.fspath(path), "its stored metadata is malformed"):
        config, width, height = read_pipeline_metadata(metadata)
    for state in states.values():
        check_stored_weights(select_entries(state, "", TEXT_ENCODER_IGNORED), os.fspath(path))
    if prediction_type is not None:
        config["scheduler"] = {**config.get("scheduler", {}), "prediction_type": prediction_type}
    with refusing(os.fspath(path), "its stored config does not build the models"):
        models = {attr: build_model(attr, config, policy) for attr in MODELS}
    load_components(SimpleNamespace(**models), **states)
    return {
        "config": config,
        "img_width": img_width or width,
        "img_height": img_height or height,
        **models,
    }
