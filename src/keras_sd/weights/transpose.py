"""PyTorch-layout tensors converted to Keras variables' layout, and back, lazily.

`match_torch_state` pairs each variable of a model with the tensor of its
PyTorch-layout state dict and a function that converts it when called
(`to_keras_tensor`), for `keras_sd.weights.deferred.initialize_deferred`. On
TensorFlow/CPU `convert_torch_tensor` reads a tensor that needs a transpose into a
reused per-thread buffer that the transpose reads in place (through DLPack), so the
only new memory it costs is the variable's own. Checkpoint loads on TensorFlow and
JAX CPUs go further (`keras_sd.weights.prefetch`): `transpose_into` writes each value
from a memory map of the file (`LazyTensor.mapped`) straight into the memory its
variable adopts. `export_lazy` is the way back: a model's variables as PyTorch-layout
`LazyTensor`s.
"""

from __future__ import annotations

import functools

import keras
import numpy as np

from keras_sd import backend
from keras_sd.weights.safetensors_io import LazyTensor
from keras_sd.weights.state_dict import (
    CheckpointError,
    keras_to_torch,
    match_state_dict,
    named_variables,
    stand_in,
    torch_layout,
)


def _moves_data(shape: tuple, permutation: tuple) -> bool:
    """Whether the transpose reorders elements (TensorFlow returns a view when it only
    moves dimensions of size 1, and a view of a scratch buffer must not escape)."""
    order = [axis for axis in permutation if shape[axis] != 1]
    return order != sorted(order)


def to_keras_tensor(tensor, variable):
    """`state_dict.torch_to_keras` producing a backend tensor of the variable's dtype."""
    shape, permutation = torch_layout(tensor.shape, variable)
    return convert_torch_tensor(tensor, shape, permutation, variable.dtype)


def convert_torch_tensor(tensor, shape: tuple, permutation: tuple | None, dtype):
    """A backend tensor of `dtype`: `tensor` viewed as `shape`, then transposed.

    The transposes run in the backend, whose blocked, multi-threaded kernels are
    faster than numpy's strided copy (most SD weights are transposed: every
    convolution and linear layer). On TensorFlow/CPU a tensor that is transposed is read
    into a reused buffer that the transpose reads in place, so its only new memory is
    the result's own.

    Example:
    >>> t = LazyTensor(lambda: np.arange(6.0).reshape(2, 3), (2, 3), np.dtype("float64"))
    >>> keras.ops.convert_to_numpy(convert_torch_tensor(t, (2, 3), (1, 0), "float32")).shape
    (3, 2)
    """
    if (
        permutation is not None
        and isinstance(tensor, LazyTensor)
        and _moves_data(shape, permutation)
    ):
        array = tensor.read(scratch=True).reshape(shape)
        borrowed = backend.borrow_numpy(array)
        if borrowed is not None:
            return keras.ops.transpose(keras.ops.cast(borrowed, dtype), permutation)
    value = keras.ops.convert_to_tensor(np.asarray(tensor).reshape(shape), dtype=dtype)
    return value if permutation is None else keras.ops.transpose(value, permutation)


_BLOCK = 64  # source rows per step of a blocked transpose (see transpose_into)


def transpose_into(source: np.ndarray, out: np.ndarray, permutation: tuple | None) -> None:
    """Write `source.transpose(permutation)` (or `source` itself, for None) into `out`,
    cast to `out`'s dtype.

    numpy copies a transposed view element by element along the output, fetching a new
    cache line of the source for each; a block of source rows at a time keeps those
    lines in cache. The copies release the GIL, so threads run side by side; blocks of
    64 rows rather than fewer because every block takes the GIL back, which the model
    build running beside them contends for. PyTorch's [O, I] and
    [O, I, kh, kw] layouts, the common cases, go block by block over O; any other
    permutation is one numpy copy.

    Example:
    >>> out = np.empty((3, 2), "float32")
    >>> transpose_into(np.arange(6.0).reshape(2, 3), out, (1, 0))
    >>> out.tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    if permutation is None:
        np.copyto(out, source.reshape(out.shape))
        return
    if permutation == (2, 3, 1, 0) and out.flags.c_contiguous:  # as [O, I, k] -> [k, I, O]
        o, i, kh, kw = source.shape
        source, out, permutation = (
            source.reshape(o, i, kh * kw),
            out.reshape(kh * kw, i, o),
            (2, 1, 0),
        )
    if permutation in ((1, 0), (2, 1, 0)):
        for start in range(0, source.shape[0], _BLOCK):
            out[..., start : start + _BLOCK] = source[start : start + _BLOCK].transpose(permutation)
        return
    np.copyto(out, source.transpose(permutation))


def match_torch_state(
    model, tensors: dict, source: str, prefix: str = "", ignore=(), convert=to_keras_tensor
) -> list:
    """Pair every variable of `model` with its PyTorch-layout tensor, read lazily.

    The matching of `state_dict.load_state_dict`, but nothing is read here: the values
    are produced later, one at a time, by `initialize_deferred`, as `convert(tensor,
    variable)` (a `prefetch.Prefetch`'s `take` hands over values converted in advance).

    Returns:
        `[(variable, value function)]` for `initialize_deferred` (or `assign`).

    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped keys.
    """
    pairs, problems = match_state_dict(model, tensors, prefix, ignore)
    if problems:
        raise CheckpointError(
            f"{source} does not match the {type(model).__name__} built for it: "
            + "; ".join(problems)
            + "."
        )
    return [(v, functools.partial(convert, t, v)) for v, t in pairs]


def export_lazy(model, prefix: str = "") -> dict:
    """`state_dict.export_state_dict` that reads each variable only when it is consumed."""
    return {
        prefix + name: LazyTensor(
            lambda v=var: keras_to_torch(np.asarray(v.numpy()), v),
            keras_to_torch(stand_in(var.shape, var.dtype), var).shape,
            var.dtype,
        )
        for name, var in named_variables(model).items()
    }
