"""Convert checkpoint tensors in worker threads while the models are still being built.

Loading a full-size model spends its time building Keras layers (pure Python) and
reading and transposing tensors (file reads and copies, which release the GIL). The
transposes depend only on each tensor's layout, and the key and shape predict that
layout before any model exists, so `Prefetch` starts them first and they run beside the
build. Each guess is checked against the variable when its value is taken; a wrong one
only costs a second conversion.

Where a variable adopts host memory it is created from (on CPUs: TensorFlow through
DLPack, JAX through `device_put`; `backend.adopt_numpy`), every value is transposed by
numpy straight into its slot of one memory area sized for all of them (the "arena"),
from a memory map of the file, by as many workers as there are cores (up to
`WORKERS`): the values are then the variables' own memory, nothing is read into a
buffer first, and the first touches of that much new memory, which cost as much as the
copying, are spread over the cores. Elsewhere (PyTorch, GPUs) creating a variable
copies, so one worker converts with the backend's kernels and stays at most
`AHEAD_BYTES` ahead of the consumer, keeping peak memory near the model's size.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from keras_sd import backend
from keras_sd.backend.memory import aligned_empty
from keras_sd.weights.safetensors_io import LazyTensor
from keras_sd.weights.state_dict import select_entries, torch_layout
from keras_sd.weights.transpose import convert_torch_tensor, transpose_into

AHEAD_BYTES = 256 * 1024 * 1024
WORKERS = 4  # arena workers at most (one per core): the copies scale with the cores
_ARENA_DTYPES = ("float16", "float32", "float64")
# 2-D weights that are lookup tables, not linear layers: they keep their layout.
_TABLES = ("token_embedding.weight", "position_embedding.weight")


def guess_layout(key: str, shape) -> tuple[tuple, tuple | None]:
    """`state_dict.torch_layout`'s likely answer for a diffusers-layout `key`, no model needed.

    Example:
    >>> guess_layout("conv_in.weight", (320, 4, 3, 3))
    ((320, 4, 3, 3), (2, 3, 1, 0))
    >>> guess_layout("text_model.embeddings.token_embedding.weight", (49408, 768))
    ((49408, 768), None)
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) == 4:
        return shape, (2, 3, 1, 0)
    if len(shape) == 2 and not key.endswith(_TABLES):
        return shape, (1, 0)
    return shape, None


def _same_values(guessed: tuple, actual: tuple) -> bool:
    """Whether converting with the `guessed` layout gives the `actual` values, up to a
    reshape: a [O, I, 1, 1] conv weight transposed to [1, 1, I, O] holds the same
    elements in the same order as the [I, O] kernel of a Dense layer made from it."""
    if guessed == actual:
        return True
    (shape, permutation), (actual_shape, actual_permutation) = guessed, actual
    return (
        permutation == (2, 3, 1, 0)
        and shape[2:] == (1, 1)
        and (actual_shape, actual_permutation) == (shape[:2], (1, 0))
    )


def _adopts_host_memory(dtype: str) -> bool:
    """Whether a variable of `dtype` created from an aligned numpy array shares its memory
    (numpy's own float dtypes only: numpy has no bfloat16)."""
    return dtype in _ARENA_DTYPES and backend.adopt_numpy(aligned_empty((16,), dtype)) is not None


def _anonymous_memory(nbytes: int) -> mmap.mmap:
    """`nbytes` of new page-aligned memory, private to this process where the system
    says so (an anonymous map is otherwise shared with child processes)."""
    private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if private:
        return mmap.mmap(-1, max(1, nbytes), flags=private)
    return mmap.mmap(-1, max(1, nbytes))


class Prefetch:
    """Converts the tensors of state dicts to backend tensors, in order, in workers.

    Args:
        states: `(state_dict, prefix, ignore)` triples in the order their variables
            will be filled (as `transpose.match_torch_state` pairs them: the entries
            `state_dict.select_entries` picks, sorted by key).
        dtype: the dtype the variables will most likely have: one for all states, or a
            list with one per state.
        budget: bytes the worker may convert ahead of `take`. Default: unlimited where
            variables adopt the values' memory (the arena, see above), else
            `AHEAD_BYTES`; a given budget always means one worker and no arena.

    Use as a context manager; `take` is the `convert` of `transpose.match_torch_state`.

    Example:
    >>> dense = keras.layers.Dense(2)
    >>> dense.build((None, 3))
    >>> state = {"weight": np.arange(6.0, dtype="float32").reshape(2, 3)}
    >>> with Prefetch([(state, "", ())], "float32") as prefetch:
    ...     value = prefetch.take(state["weight"], dense.kernel)
    >>> keras.ops.convert_to_numpy(value).tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """

    def __init__(self, states, dtype, budget: float | None = None):
        states = list(states)
        dtypes = [dtype] * len(states) if isinstance(dtype, str) else list(dtype)
        dtypes = [keras.backend.standardize_dtype(d) for d in dtypes]
        jobs = [
            (tensor, guess_layout(key, tensor.shape), kind)
            for (state, prefix, ignore), kind in zip(states, dtypes, strict=True)
            for key, tensor in sorted(select_entries(state, prefix, ignore).items())
        ]
        sizes = [math.prod(shape) * np.dtype(kind).itemsize for _, (shape, _), kind in jobs]
        slots = [None] * len(jobs)
        self._arena = None
        if budget is None and all(_adopts_host_memory(d) for d in set(dtypes)):
            budget, workers = math.inf, max(1, min(WORKERS, os.cpu_count() or 1))
            step = backend.HOST_ALIGNMENT
            padded = [-(-n // step) * step for n in sizes]
            slots = np.cumsum([0, *padded[:-1]]).tolist()
            self._arena = _anonymous_memory(sum(padded))
        else:
            budget, workers = (AHEAD_BYTES if budget is None else budget), 1
        self._budget = budget
        self._ahead, self._closed, self._wanted = 0, False, None
        self._turn = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="keras-sd-prefetch")
        self._jobs = {}
        for (tensor, layout, kind), nbytes, slot in zip(jobs, sizes, slots, strict=True):
            future = self._pool.submit(self._convert, tensor, layout, kind, nbytes, slot)
            self._jobs[id(tensor)] = (layout, nbytes, future)

    def _convert(self, tensor, layout, dtype, nbytes, slot):
        with self._turn:
            self._turn.wait_for(
                lambda: self._closed or self._ahead < self._budget or self._wanted is tensor
            )
            if self._closed:
                return None
            self._ahead += nbytes
        if slot is None:
            return convert_torch_tensor(tensor, *layout, dtype)
        shape, permutation = layout
        if permutation is not None:
            shape = tuple(shape[axis] for axis in permutation)
        out = np.frombuffer(self._arena, dtype, math.prod(shape), slot).reshape(shape)
        source = (
            tensor.mapped()
            if isinstance(tensor, LazyTensor)
            else contextlib.nullcontext(np.asarray(tensor))
        )
        with source as values:
            transpose_into(values.reshape(layout[0]), out, permutation)
        adopted = backend.adopt_numpy(out)
        return keras.ops.convert_to_tensor(out) if adopted is None else adopted

    def take(self, tensor, variable):
        """`variable`'s value from `tensor`: the one converted ahead when its layout and
        dtype were guessed right, else converted now (from the file's values: a value
        converted to another dtype could have lost precision)."""
        actual = torch_layout(tensor.shape, variable)
        guessed, nbytes, future = self._jobs.pop(id(tensor), (None, 0, None))
        value = None
        if future is not None and not future.cancel():  # cancelled: it never started
            with self._turn:  # its turn even when the budget is spent: no deadlock
                self._wanted = tensor
                self._turn.notify_all()
            value = future.result()
            with self._turn:
                self._wanted = None
                self._ahead -= nbytes if value is not None else 0
                self._turn.notify_all()
        if (
            value is None
            or not _same_values(guessed, actual)
            or keras.backend.standardize_dtype(value.dtype) != variable.dtype
        ):
            return convert_torch_tensor(tensor, *actual, variable.dtype)
        if tuple(value.shape) != tuple(variable.shape):
            value = keras.ops.reshape(value, variable.shape)
        return value

    def close(self) -> None:
        """Stop converting and drop every value not taken."""
        with self._turn:
            self._closed = True
            self._turn.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._jobs.clear()
        self._arena = None  # the values taken keep their part of it

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["AHEAD_BYTES", "Prefetch", "guess_layout"]
