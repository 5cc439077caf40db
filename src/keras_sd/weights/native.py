"""keras-sd's own checkpoint layout: every weight already in Keras' layout, mapped on load.

Loading a CompVis file or a diffusers folder reads every tensor and transposes most of
them (PyTorch stores convolutions as [out, in, kh, kw] and linear layers as [out, in];
Keras as [kh, kw, in, out] and [in, out]) into new memory. A file written with
`save_checkpoint(sd, path, layout="keras")` stores the variables as they are, so nothing
needs converting. On CPUs the variables are then made straight from a copy-on-write
memory map of the file (TensorFlow adopts it through DLPack; JAX shares aligned host
arrays by itself): no tensor is read at load time, the operating
system pages the weights in when they are first used, processes that load the same file
share those pages, and writing a variable (training) never changes the file.

The file is a valid safetensors file. Keys are `"<component>/<state-dict name>"` (for
example `"diffusion_model/conv_in.weight"`, the names of
`keras_sd.weights.state_dict.named_variables`), values in Keras layout. Its metadata
holds the format tag, the model config (JSON), the tokenizer's added tokens and the
default image size. Tensors whose byte size is a multiple of 64 come first and start on
64-byte boundaries (TensorFlow's kernels need that alignment to use memory they did not
allocate); the few others follow and are copied when loaded.

Mapping needs the file to stay as it is while the model lives: replacing it (keras-sd
writes by renaming a finished file into place) is safe, but overwriting it in place
would change or invalidate the weights of running processes, as with any memory-mapped
checkpoint.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import keras
import numpy as np

from keras_sd import backend
from keras_sd.weights import deferred, safetensors_io
from keras_sd.weights.state_dict import (
    CheckpointError,
    check_stored_weights,
    describe_problems,
    named_variables,
    refusing,
)

FORMAT = "keras_sd.keras_layout"
VERSION = "1"
ALIGNMENT = 64
_SEPARATOR = "/"


def is_keras_layout(path) -> bool:
    """Whether `path` is a `.safetensors` file written with `layout="keras"`.

    Reads the header only. False for folders, other suffixes and other safetensors files.

    Example:
    >>> is_keras_layout("v1-5-pruned-emaonly.safetensors")  # doctest: +SKIP
    False
    """
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    try:
        _, metadata = safetensors_io.read_safetensors(path)
    except ValueError:
        return False  # not readable as safetensors at all: the regular loader explains
    return metadata.get("format") == FORMAT


def save_keras_layout(sd, path, dtype: str | None = None) -> None:
    """Write a `StableDiffusion` as a keras-layout `.safetensors` file (see the module doc).

    Args:
        sd: a `StableDiffusion`.
        path: the `.safetensors` file to write; replaced only once complete.
        dtype: None keeps the variables' dtype; "float16" or "float32" converts (a file
            is mapped without a copy only when its dtype is the loading policy's
            variable dtype, float32 by default).

    Example:
    >>> save_keras_layout(sd, "sd15-keras.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"a keras-layout checkpoint is written as .safetensors; received {path}.")
    tensors = {}
    for component in deferred.MODELS:
        for name, variable in named_variables(getattr(sd, component)).items():
            tensors[component + _SEPARATOR + name] = safetensors_io.LazyTensor(
                lambda v=variable: np.asarray(keras.ops.convert_to_numpy(v.value)),
                tuple(variable.shape),
                np.dtype(variable.dtype),
            )
    metadata = pipeline_metadata(sd, FORMAT, VERSION)
    safetensors_io.write_safetensors(path, tensors, dtype, metadata, alignment=ALIGNMENT)


def pipeline_metadata(sd, format_name: str, version: str) -> dict:
    """The safetensors metadata that rebuilds `sd` around its weights: format tag and
    version, model config (JSON), default image size and the tokenizer's added tokens.

    Example:
    >>> pipeline_metadata(sd, FORMAT, VERSION)["img_width"]  # doctest: +SKIP
    '64'
    """
    config = dict(sd.config)
    config["tokenizer"] = {
        k: v for k, v in config["tokenizer"].items() if k not in ("added_tokens", "vocab_path")
    }
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

    A file's metadata is data, never a path to open: a `tokenizer.vocab_path` in it is
    dropped, so the bundled vocabulary is used (pass a tokenizer of your own to change it).

    Raises:
        CheckpointError: an entry is missing or malformed.

    Example:
    >>> entries = {"config": '{"tokenizer": {"vocab_path": "/etc/passwd"}}',
    ...            "img_width": "64", "img_height": "32", "added_tokens": '["<cat-toy>"]'}
    >>> read_pipeline_metadata(entries)
    ({'tokenizer': {'added_tokens': ['<cat-toy>']}}, 64, 32)
    """
    try:
        config = json.loads(metadata["config"])
        added = json.loads(metadata.get("added_tokens", "[]"))
        width, height = int(metadata["img_width"]), int(metadata["img_height"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the stored pipeline metadata is malformed ({err}).") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise CheckpointError("the stored model config is not an object of per-component objects.")
    if not isinstance(added, list) or not all(isinstance(t, str) for t in added):
        raise CheckpointError(f"the stored added tokens are not a list of strings: {added!r:.80}.")
    tokenizer = config.setdefault("tokenizer", {})
    tokenizer.pop("vocab_path", None)
    if added:
        tokenizer["added_tokens"] = added
    return config, width, height


def _mapped_values(path: str, tensors: dict):
    """`{key: array}` views of a copy-on-write map of `path` (bfloat16 ones excepted)."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    views = {}
    for key, tensor in tensors.items():
        if tensor.file_offset is not None:
            count = math.prod(tensor.shape)
            view = np.frombuffer(mapping, tensor.dtype, count, tensor.file_offset)
            views[key] = view.reshape(tensor.shape)
    return views


def _value_function(tensor, variable, mapped):
    """What `deferred.initialize_deferred` calls for one variable's value: the mapped
    memory itself where the backend can adopt it (aligned, same dtype), else a copy."""
    if mapped is not None and mapped.dtype.name == variable.dtype:
        adopted = backend.borrow_numpy(mapped)
        if adopted is not None:
            return lambda: adopted
    source = tensor if mapped is None else mapped
    return lambda: keras.ops.convert_to_tensor(np.asarray(source), dtype=variable.dtype)


def keras_layout_kwargs(
    path,
    *,
    prediction_type: str | None = None,
    img_width=None,
    img_height=None,
    policy: str | None = None,
) -> dict:
    """The `StableDiffusion(...)` arguments stored by `save_keras_layout`: config,
    image size and components (weights mapped on CPUs when the file's dtype is the
    policy's variable dtype, else copied).

    Args:
        path: a keras-layout `.safetensors` file.
        prediction_type: overrides the stored scheduler's "epsilon"/"v_prediction".
        img_width, img_height: default image size; default the stored one.
        policy: the models' dtype policy (`keras_sd.weights.precision.load_policy`);
            None: the global one.

    Raises:
        CheckpointError: the file's tensors do not fit the models its config describes.
        ValueError: not a keras-layout file, or a truncated or unreadable one.

    Example:
    >>> sd = StableDiffusion(**keras_layout_kwargs("sd15-keras.safetensors"))  # doctest: +SKIP
    """
    path = os.fspath(path)
    tensors, metadata = safetensors_io.read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a keras-layout checkpoint (metadata format="
            f"{metadata.get('format')!r}, expected {FORMAT!r}); load it with "
            "StableDiffusion.from_checkpoint."
        )
    with refusing(path, "its stored metadata is malformed"):
        config, width, height = read_pipeline_metadata(metadata)
    if prediction_type is not None:
        config["scheduler"] = {**config.get("scheduler", {}), "prediction_type": prediction_type}
    models = deferred.build_models_deferred(config, path, policy)
    try:
        pairs = _match(models, tensors, _mapped_values(path, tensors), path)
    except Exception:
        deferred.forget_deferred(models.values())
        raise
    deferred.initialize_deferred(models.values(), pairs)
    return {
        "config": config,
        "img_width": img_width or width,
        "img_height": img_height or height,
        **models,
    }


def _match(models: dict, tensors: dict, mapped: dict, source: str) -> list:
    """`[(variable, value function)]` for every variable, or a CheckpointError naming
    the missing, unexpected and mis-shaped keys."""
    expected = {
        component + _SEPARATOR + name: variable
        for component, model in models.items()
        for name, variable in named_variables(model).items()
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{key} (file {tensors[key].shape}, model {tuple(variable.shape)})"
        for key, variable in expected.items()
        if key in tensors and tensors[key].shape != tuple(variable.shape)
    ]
    problems = describe_problems(missing, unexpected, mismatched)
    if problems:
        raise CheckpointError(
            f"{source} does not match the models its config describes: " + "; ".join(problems) + "."
        )
    check_stored_weights(tensors, source)
    return [
        (variable, _value_function(tensors[key], variable, mapped.get(key)))
        for key, variable in expected.items()
    ]


__all__ = ["FORMAT", "is_keras_layout", "keras_layout_kwargs", "save_keras_layout"]
