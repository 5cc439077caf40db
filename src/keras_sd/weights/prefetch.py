"""Convert checkpoint tensors in a worker thread while the models are still being built.

Loading a full-size model spends over a second building Keras layers (pure Python)
and several seconds reading and transposing tensors (file reads and backend kernels,
which release the GIL). The transposes depend only on each tensor's layout, and the
key and shape predict that layout before any model exists, so `Prefetch` starts them
first and they run beside the build. Each guess is checked against the variable when
its value is taken; a wrong one only costs a second conversion.

On TensorFlow a variable adopts the tensor it is created from without a copy, so the
values converted ahead are the variables' own memory and the worker may run ahead
without limit. Elsewhere creating a variable copies, so the worker stays at most
`AHEAD_BYTES` ahead of the consumer, keeping peak memory near the model's size.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from keras_sd.weights.state_dict import select_entries, torch_layout
from keras_sd.weights.streaming import convert_torch_tensor

AHEAD_BYTES = 256 * 1024 * 1024
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


class Prefetch:
    """Converts the tensors of state dicts to backend tensors, in order, in one worker.

    Args:
        states: `(state_dict, prefix, ignore)` triples in the order their variables
            will be filled (as `streaming.match_torch_state` pairs them: the entries
            `state_dict.select_entries` picks, sorted by key).
        dtype: the dtype the variables will most likely have.
        budget: bytes the worker may convert ahead of `take`. Default: unlimited on
            TensorFlow (see above), else `AHEAD_BYTES`.

    Use as a context manager; `take` is the `convert` of `streaming.match_torch_state`.

    Example:
    >>> from keras_sd.weights import streaming
    >>> dense = keras.layers.Dense(2)
    >>> dense.build((None, 3))
    >>> state = {"weight": np.arange(6.0, dtype="float32").reshape(2, 3)}
    >>> with Prefetch([(state, "", ())], "float32") as prefetch:
    ...     value = prefetch.take(state["weight"], dense.kernel)
    >>> keras.ops.convert_to_numpy(value).tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """

    def __init__(self, states, dtype, budget: float | None = None):
        self._dtype = keras.backend.standardize_dtype(dtype)
        if budget is None:
            budget = math.inf if keras.backend.backend() == "tensorflow" else AHEAD_BYTES
        self._budget = budget
        self._ahead, self._closed, self._wanted = 0, False, None
        self._turn = threading.Condition()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="keras-sd-prefetch")
        self._jobs = {}
        for state, prefix, ignore in states:
            for key, tensor in sorted(select_entries(state, prefix, ignore).items()):
                layout = guess_layout(key, tensor.shape)
                nbytes = math.prod(layout[0]) * np.dtype(self._dtype).itemsize
                future = self._pool.submit(self._convert, tensor, layout, nbytes)
                self._jobs[id(tensor)] = (layout, nbytes, future)

    def _convert(self, tensor, layout, nbytes):
        with self._turn:
            self._turn.wait_for(
                lambda: self._closed or self._ahead < self._budget or self._wanted is tensor
            )
            if self._closed:
                return None
            self._ahead += nbytes
        return convert_torch_tensor(tensor, *layout, self._dtype)

    def take(self, tensor, variable):
        """`variable`'s value from `tensor`: the one converted ahead when its layout was
        guessed right, else converted now."""
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
        if value is None or not _same_values(guessed, actual):
            return convert_torch_tensor(tensor, *actual, variable.dtype)
        if tuple(value.shape) != tuple(variable.shape):
            value = keras.ops.reshape(value, variable.shape)
        if keras.backend.standardize_dtype(value.dtype) != variable.dtype:
            value = keras.ops.cast(value, variable.dtype)
        return value

    def close(self) -> None:
        """Stop converting and drop every value not taken."""
        with self._turn:
            self._closed = True
            self._turn.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._jobs.clear()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["AHEAD_BYTES", "Prefetch", "guess_layout"]
