"""Map Keras variables to PyTorch-style state-dict names and back.

Every keras-sd model names its sublayers after the matching PyTorch module,
with `-` where PyTorch has `.` (`down_blocks-0-resnets-1`, `self_attn-q_proj`),
so the name of each variable in a diffusers/transformers state dict follows
from the layer tree alone. (Keras' PyTorch backend keys parameters by layer
path, and torch forbids dots there, hence the separator.) This module is the
one place that knows the layout difference: PyTorch stores `Linear` weights
as [out, in] and `Conv2d` weights as [out, in, kh, kw]; Keras stores [in, out]
and [kh, kw, in, out].
"""

from __future__ import annotations

import contextlib

import numpy as np
from keras import layers

# Keras variable name -> PyTorch parameter name for the built-in layers we use.
_PARAM_NAMES = {
    layers.Dense: {"kernel": "weight", "bias": "bias"},
    layers.Conv2D: {"kernel": "weight", "bias": "bias"},
    layers.Embedding: {"embeddings": "weight"},
    layers.LayerNormalization: {"gamma": "weight", "beta": "bias"},
}


# Stands for "." inside layer names (see the module docstring).
NAME_SEPARATOR = "-"


class CheckpointError(ValueError):
    """A checkpoint is refused: it does not match the model, or it is malformed or hostile.

    Example:
    >>> import os, tempfile, keras_sd
    >>> path = os.path.join(tempfile.mkdtemp(), "bad.safetensors")
    >>> _ = open(path, "wb").write(b"not a checkpoint")
    >>> try:
    ...     keras_sd.StableDiffusion.from_checkpoint(path)
    ... except keras_sd.CheckpointError as error:
    ...     print(str(error).split(":")[0].endswith("as a safetensors file"))
    True
    """


@contextlib.contextmanager
def refusing(source: str, what: str):
    """Errors raised while using what a file says (its keys, shapes, config) become a
    `CheckpointError` that names the file, instead of a traceback from deep inside.

    Example:
    >>> with refusing("model.safetensors", "its config does not build the models"):
    ...     {}["unet"]
    Traceback (most recent call last):
    ...
    keras_sd.weights.state_dict.CheckpointError: model.safetensors: its config ... 'unet').
    """
    try:
        yield
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as err:
        raise CheckpointError(
            f"{source}: {what} ({type(err).__name__}: {str(err)[:300]})."
        ) from None


def _param_name(layer, variable) -> str:
    short = variable.path.split("/")[-1]
    for cls, names in _PARAM_NAMES.items():
        if isinstance(layer, cls):
            return names[short]
    return short


def _direct_sublayers(layer):
    return layer._flatten_layers(include_self=False, recursive=False)


def _own_variables(layer):
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def named_variables(model) -> dict:
    """Return `{torch_style_name: keras.Variable}` for every weight of `model`.

    Names are the dotted path of layer names below `model` (the model's own
    name is not included; `-` inside a name also becomes `.`), followed by the
    PyTorch parameter name.

    Example:
    >>> from keras_sd.models.clip_text import TINY_CONFIG, CLIPTextEncoder
    >>> sorted(named_variables(CLIPTextEncoder(**TINY_CONFIG)))[0]
    'embeddings.position_embedding.weight'
    """
    if not model.built:
        raise ValueError(f"Model {model.name!r} must be built before its weights can be named.")
    out = {}

    def visit(layer, prefix):
        for var in _own_variables(layer):
            out[prefix + _param_name(layer, var)] = var
        for child in _direct_sublayers(layer):
            visit(child, prefix + child.name.replace(NAME_SEPARATOR, ".") + ".")

    visit(model, "")
    return out


def torch_layout(shape, variable) -> tuple[tuple, tuple | None]:
    """How a PyTorch-layout tensor of `shape` becomes `variable`'s value, without reading it.

    Returns:
        `(shape, permutation)`: the shape to view the tensor as first (a 1x1 conv weight
        [O, I, 1, 1] stored where keras-sd has a Dense layer, as in old VAE attention
        checkpoints, is viewed as [O, I]), then the transpose to apply (None: none).
        Conv [O, I, kh, kw] -> [kh, kw, I, O]; Linear [out, in] -> Dense [in, out].

    Example:
    >>> from keras import layers
    >>> dense = layers.Dense(3)
    >>> dense.build((None, 5))
    >>> torch_layout((3, 5, 1, 1), dense.kernel)
    ((3, 5), (1, 0))
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) == 4 and len(variable.shape) == 4:
        return shape, (2, 3, 1, 0)
    if len(shape) == 4 and len(variable.shape) == 2 and shape[2:] == (1, 1):
        shape = shape[:2]
    if len(shape) == 2 and _is_dense(variable):
        return shape, (1, 0)
    return shape, None


def torch_to_keras(value: np.ndarray, variable) -> np.ndarray:
    """Convert one PyTorch-layout array to the layout of `variable`."""
    shape, permutation = torch_layout(np.shape(value), variable)
    value = np.asarray(value).reshape(shape)
    return value if permutation is None else value.transpose(permutation)


def keras_to_torch(value: np.ndarray, variable) -> np.ndarray:
    """Convert the value of `variable` to PyTorch layout (inverse of `torch_to_keras`)."""
    value = np.asarray(value)
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2 and _is_dense(variable):
        return value.T
    return value


def _is_dense(variable) -> bool:
    return variable.path.endswith("kernel")


def summarize(title: str, items: list[str], limit: int = 8) -> str:
    """ "N title: a, b, ... (+M more)": the first `limit` items of a list of problems."""
    shown = ", ".join(items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {title}: {shown}{more}"


def stand_in(shape, dtype) -> np.ndarray:
    """A read-only array of `shape` that uses no memory (all elements alias one zero)."""
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def keras_shape(tensor, variable) -> tuple:
    """The shape `tensor` (PyTorch layout) takes in `variable`'s layout, without reading it."""
    shape, permutation = torch_layout(tensor.shape, variable)
    return shape if permutation is None else tuple(shape[axis] for axis in permutation)


def select_entries(state_dict: dict, prefix: str = "", ignore=()) -> dict:
    """The entries of `state_dict` a model is matched against: keys with `prefix`, which
    is stripped, except those ending in one of the `ignore` suffixes.

    Example:
    >>> select_entries({"m.a": 1, "m.position_ids": 2, "b": 3}, "m.", ("position_ids",))
    {'a': 1}
    """
    found = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in found.items() if not k.endswith(tuple(ignore))}


def check_stored_weights(tensors: dict, source: str) -> None:
    """Refuse weights stored with a non-floating dtype or an empty dimension: every SD
    weight is a non-empty float tensor, integer bits read as weights give garbage
    without any error, and an empty tensor's other dimensions cost nothing to state
    but size the model built from them.

    Raises:
        CheckpointError: naming the entries and their dtypes or shapes.

    Example:
    >>> check_stored_weights({"w": np.zeros(2, "float16")}, "model.safetensors")
    >>> check_stored_weights({"w": np.zeros(2, "int32")}, "model.safetensors")
    Traceback (most recent call last):
    ...
    keras_sd.weights.state_dict.CheckpointError: model.safetensors stores ...: w (int32).
    """
    dtypes = {key: np.dtype(value.dtype) for key, value in tensors.items()}
    bad = [f"{key} ({dtype.name})" for key, dtype in dtypes.items() if dtype.kind != "f"]
    if bad:
        raise CheckpointError(
            f"{source} stores weights as non-floating dtypes: {', '.join(bad[:5])}."
        )
    empty = [f"{key} {tuple(value.shape)}" for key, value in tensors.items() if 0 in value.shape]
    if empty:
        raise CheckpointError(f"{source} stores empty weights: {', '.join(empty[:5])}.")


def match_state_dict(model, state_dict: dict, prefix: str = "", ignore=()):
    """Pair the variables of `model` with the entries of a PyTorch-layout state dict.

    Only names and shapes are compared; no value is read, so lazy tensors stay lazy.

    Args:
        model: a built keras-sd model.
        state_dict: `{name: array-like}`; anything with `shape` and `dtype`.
        prefix: keys without it are ignored, and it is stripped from the others.
        ignore: key suffixes that are not weights (buffers such as `position_ids`).

    Returns:
        `(pairs, problems)`: `[(variable, tensor)]` for every variable whose entry fits,
        and one summary string each for missing keys, unexpected keys and shape
        mismatches (only the kinds that occur; keys are given with their prefix).

    Example:
    >>> from keras_sd.models.clip_text import TINY_CONFIG, CLIPTextEncoder
    >>> pairs, problems = match_state_dict(CLIPTextEncoder(**TINY_CONFIG), {"x.weight": np.ones(2)})
    >>> len(pairs), problems[1]
    (0, '1 unexpected keys: x.weight')
    """
    targets = named_variables(model)
    found = select_entries(state_dict, prefix, ignore)
    missing = [prefix + k for k in sorted(set(targets) - set(found))]
    unexpected = [prefix + k for k in sorted(set(found) - set(targets))]
    pairs, mismatched = [], []
    for name in sorted(set(targets) & set(found)):
        variable, tensor = targets[name], found[name]
        if keras_shape(tensor, variable) != tuple(variable.shape):
            mismatched.append(
                f"{prefix}{name} (file {tuple(tensor.shape)}, model {tuple(variable.shape)})"
            )
            continue
        pairs.append((variable, tensor))
    return pairs, describe_problems(missing, unexpected, mismatched)


def describe_problems(missing: list, unexpected: list, mismatched: list) -> list[str]:
    """One `summarize` line for each kind of mismatch that occurs.

    Example:
    >>> describe_problems(["a.weight"], [], ["b.bias (file (3,), model (4,))"])
    ['1 missing keys: a.weight', '1 shape mismatches: b.bias (file (3,), model (4,))']
    """
    return [
        summarize(what, keys)
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]


def load_state_dict(
    model,
    state_dict: dict,
    prefix: str = "",
    ignore: tuple[str, ...] = (),
    strict: bool = True,
) -> None:
    """Assign a PyTorch-layout state dict to a built Keras model.

    Args:
        model: a built keras-sd model (or any layer tree named after PyTorch modules).
        state_dict: mapping of names to arrays (numpy, or anything `np.asarray` takes).
        prefix: stripped from every key before matching (e.g. `"text_model."`).
        ignore: key suffixes that are not weights (buffers such as `position_ids`).
        strict: when True, missing, unexpected or mis-shaped keys raise `CheckpointError`
            naming them; nothing is assigned unless everything matches.

    Example:
    >>> load_state_dict(unet, torch_unet.state_dict())  # doctest: +SKIP
    """
    state_dict = {
        k: v if hasattr(v, "shape") and hasattr(v, "dtype") else np.asarray(v)
        for k, v in state_dict.items()
    }
    pairs, problems = match_state_dict(model, state_dict, prefix, ignore)
    if strict and problems:
        raise CheckpointError(
            f"Checkpoint does not match {type(model).__name__} {model.name!r}. "
            + " ".join(problems)
        )
    for variable, tensor in pairs:
        variable.assign(torch_to_keras(np.asarray(tensor), variable))


def export_state_dict(model, prefix: str = "") -> dict[str, np.ndarray]:
    """Return the model's weights as a PyTorch-layout `{name: np.ndarray}` dict."""
    return {
        prefix + name: keras_to_torch(np.asarray(var.numpy()), var)
        for name, var in named_variables(model).items()
    }
