"""Stream weights between files and models, a few tensors in memory at a time.

Files: `read_safetensors` parses the header only and returns `LazyTensor`s whose
shape and dtype are known at once and whose values are read (with plain file
reads, no memory map, so the page cache is not charged to the process) when a
consumer asks for them. `write_safetensors` writes the header from shapes and
dtypes, then each tensor in turn, to a temporary file renamed into place when
complete. The format: 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian bytes (https://github.com/huggingface/safetensors).

Models: `build_models_deferred` creates the SD models with variables that have no
values yet (Keras defers initialization inside a `StatelessScope`), and
`initialize_deferred` gives each variable its value straight from the file, reading
and converting in worker threads a few tensors ahead. A full-size model then costs one
read and one layout conversion per tensor instead of a random initialization plus a
copy (seconds instead of ~15 s on CPU), and peak memory stays near the model's own size
instead of twice that. On TensorFlow/CPU `convert_torch_tensor` reads a tensor that
needs a transpose into a reused per-thread buffer that the transpose reads in place
(through DLPack), so the only new memory it costs is the variable's own. Checkpoint
loads on TensorFlow and JAX CPUs go further (`keras_sd.weights.prefetch`):
`transpose_into` writes each value from a memory map of the file (`LazyTensor.mapped`)
straight into the memory its variable adopts.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np

from keras_sd import backend
from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.weights.safe_pickle import _bfloat16_to_float32
from keras_sd.weights.state_dict import (
    CheckpointError,
    keras_to_torch,
    match_state_dict,
    named_variables,
    stand_in,
    torch_layout,
)

# StableDiffusion attribute -> model class and its config key.
MODELS = {
    "text_encoder": (CLIPTextEncoder, "text_encoder"),
    "diffusion_model": (UNet, "unet"),
    "decoder": (VAEDecoder, "vae"),
    "image_encoder": (VAEEncoder, "vae"),
}

# safetensors dtype tag <-> little-endian numpy dtype. BF16 is read as raw bits.
_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
_TAGS = {np.dtype(v).name: k for k, v in _DTYPES.items() if k != "BF16"}
_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library enforces


class LazyTensor:
    """A tensor whose values are produced on demand; shape and dtype are known up front.

    Supports what key-mapping code needs: `shape`, `ndim`, `dtype`, basic indexing
    (which stays lazy) and `np.asarray`.

    Args:
        load: returns the full array when called.
        shape: its shape.
        dtype: its numpy dtype.

    Example:
    >>> t = LazyTensor(lambda: np.arange(6.0).reshape(2, 3), (2, 3), np.dtype("float64"))
    >>> t[:, 1:].shape, np.asarray(t[1]).tolist()
    ((2, 2), [3.0, 4.0, 5.0])
    """

    __slots__ = ("_load", "shape", "dtype", "_index")

    def __init__(self, load: Callable[[], np.ndarray], shape, dtype, index: tuple = ()):
        self._load = load
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self._index = index

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> LazyTensor:
        shape = stand_in(self.shape, self.dtype)[index].shape
        return LazyTensor(self._load, shape, self.dtype, (*self._index, index))

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.read(), dtype=dtype)

    @property
    def file_offset(self) -> int | None:
        """The byte offset of this tensor's stored values in its safetensors file, when
        they are its values as they are (not a slice, not widened from bfloat16)."""
        reader = self._load
        if self._index or not isinstance(reader, _TensorReader) or reader.bfloat16:
            return None
        return reader.offset

    @contextlib.contextmanager
    def mapped(self):
        """The values for a consumer that copies them at once, without reading them into
        memory of the process's own: a read-only view of a memory map of the stored
        values where they are used as they are (`file_offset`), unmapped on exit, else
        `read(scratch=True)`.

        Example:
        >>> t = LazyTensor(lambda: np.arange(6.0).reshape(2, 3), (2, 3), np.dtype("float64"))
        >>> with t.mapped() as values:
        ...     values.tolist()
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        """
        offset = self.file_offset
        if offset is None or not self.shape or 0 in self.shape:
            yield self.read(scratch=True)
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        with open(self._load.path, "rb") as f:
            mapping = mmap.mmap(
                f.fileno(), offset - start + nbytes, offset=start, access=mmap.ACCESS_READ
            )
        values = np.frombuffer(mapping, self.dtype, math.prod(self.shape), offset - start)
        try:
            yield values.reshape(self.shape)
        finally:
            del values
            try:
                mapping.close()
            except BufferError:  # the consumer kept a view: the map closes with it
                pass

    def read(self, scratch: bool = False) -> np.ndarray:
        """The values; with `scratch`, possibly in a buffer the next scratch read of the
        same thread overwrites (for consumers that copy them at once)."""
        value = (
            self._load(scratch=True)
            if scratch and isinstance(self._load, _TensorReader)
            else self._load()
        )
        for index in self._index:
            value = value[index]
        return value

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _unreadable(path, reason: str) -> ValueError:
    return ValueError(
        f"cannot read {path} as a safetensors file: {reason}. The file may be truncated "
        "(an interrupted download?), corrupted, or not a safetensors file at all."
    )


def aligned_empty(shape, dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialized C-contiguous array whose data start on an `alignment`-byte boundary.

    Eigen's vectorized kernels (TensorFlow's) assume 64-byte alignment for arrays handed
    over without a copy; numpy itself guarantees only 16 bytes.

    Example:
    >>> aligned_empty((3, 5), "float32").ctypes.data % 64
    0
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


_SCRATCH = threading.local()  # one reusable read buffer per loading thread


def _scratch(shape, dtype) -> np.ndarray:
    """This thread's reusable aligned buffer, viewed as `shape` and `dtype`."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.size < nbytes:
        buffer = _SCRATCH.buffer = aligned_empty((nbytes,), np.uint8)
    return buffer[:nbytes].view(dtype).reshape(shape)


class _TensorReader:
    """Reads one tensor of a safetensors file into a new array, or into this thread's
    scratch buffer (`scratch=True`: valid until the thread's next scratch read)."""

    def __init__(self, path: str, offset: int, dtype: str, shape: tuple, bfloat16: bool):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, shape
        self.bfloat16 = bfloat16

    def __call__(self, scratch: bool = False) -> np.ndarray:
        make = _scratch if scratch and not self.bfloat16 else aligned_empty
        data = make(self.shape, self.dtype)
        buffer, filled = memoryview(data.reshape(-1).view(np.uint8)), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            while filled < len(buffer):  # one read returns at most ~2 GiB on Linux
                got = f.readinto(buffer[filled:])
                if not got:
                    raise _unreadable(self.path, f"a tensor at byte {self.offset} is cut short")
                filled += got
        return _bfloat16_to_float32(data) if self.bfloat16 else data


def read_safetensors(path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Open a safetensors file lazily: `({name: LazyTensor}, metadata)`.

    Every entry of the header is validated against the file size first, so a
    truncated file fails here with a clear message instead of at some later read.
    BF16 tensors are widened to float32 (exactly) when read.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a malformed header or a file shorter than its header says.

    Example:
    >>> tensors, metadata = read_safetensors("model.safetensors")  # doctest: +SKIP
    >>> tensors["conv_in.weight"].shape  # doctest: +SKIP
    (320, 4, 3, 3)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _unreadable(path, f"the file has only {size} bytes")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise _unreadable(path, f"the header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _unreadable(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    tensors = {}
    for name, info in header.items():
        try:
            tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            dtype = np.dtype(_DTYPES[tag])
            shape = tuple(int(n) for n in shape)
            valid = 0 <= begin <= end and min(shape, default=0) >= 0
        except (KeyError, TypeError, ValueError):
            raise _unreadable(path, f"invalid header entry for {name!r}: {info!r}") from None
        if not valid or end - begin != math.prod(shape) * dtype.itemsize:
            raise _unreadable(path, f"tensor {name!r} has inconsistent offsets {[begin, end]}")
        if start + end > size:
            raise _unreadable(
                path, f"tensor {name!r} ends at byte {start + end} but the file has {size} bytes"
            )
        bfloat16 = tag == "BF16"
        tensors[name] = LazyTensor(
            _TensorReader(path, start + begin, dtype.str, shape, bfloat16),
            shape,
            np.float32 if bfloat16 else dtype,
        )
    return tensors, metadata


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, so readers never see a partial file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_safetensors(
    path, tensors: dict, dtype: str | None = None, metadata=None, alignment: int = 8
) -> None:
    """Write `{name: array-like}` (numpy arrays or `LazyTensor`s) as a safetensors file.

    Args:
        path: the file to write; replaced only once the new file is complete.
        tensors: arrays in PyTorch layout, read one at a time.
        dtype: None keeps each tensor's dtype; "float16"/"float32" converts the
            floating-point ones.
        metadata: extra string entries for the header (`"format": "pt"` is always set,
            as transformers requires it).
        alignment: the data start on a multiple of this many bytes (8 or more, a power
            of two). Above 8, the tensors whose size is a multiple of it come first, so
            each of them starts aligned too (the format allows no gaps between tensors).

    Example:
    >>> write_safetensors("model.safetensors", {"w": np.ones((2, 3))}, "float32")  # doctest: +SKIP
    """
    if alignment < 8 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= 8; received {alignment!r}.")
    path = Path(path)
    entries = []
    for name in sorted(tensors):
        tensor = tensors[name]
        source = np.dtype(tensor.dtype)
        target = np.dtype(dtype) if dtype and source.kind == "f" else source
        if target.name not in _TAGS:
            raise ValueError(f"cannot write tensor {name!r} of dtype {target} to safetensors")
        shape = tuple(int(n) for n in tensor.shape)
        entries.append((name, target, shape, math.prod(shape) * target.itemsize))
    if alignment > 8:  # stable: aligned sizes first, each group in name order
        entries.sort(key=lambda entry: entry[3] % alignment != 0)
    header, plan, offset = {}, [], 0
    for name, target, shape, nbytes in entries:
        header[name] = {
            "dtype": _TAGS[target.name],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        plan.append((name, target.newbyteorder("<"), shape))
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % alignment)  # the data start aligned (8 at least)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, target, shape in plan:
                array = np.asarray(np.asarray(tensors[name]), dtype=target, order="C")
                if array.shape != shape:
                    raise ValueError(f"tensor {name!r} has shape {array.shape}, announced {shape}")
                f.write(array.reshape(-1).view(np.uint8))  # the bytes, without a copy
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ------------------------------------------------------------------------- models
@contextlib.contextmanager
def paused_gc():
    """Pause Python's cyclic garbage collector while a model loads; its previous state
    comes back on exit (an outer pause or a user's `gc.disable()` is kept).

    Building a full-size SD creates about 75,000 long-lived objects (Keras layers,
    variables and their trackers), enough allocations to start full collections, and each
    walks the whole heap (about 450,000 objects once TensorFlow and Keras are loaded):
    0.24 s per collection for SD 1.5 on TensorFlow, in the main thread, holding the GIL
    that the conversion workers need between their copies. A load leaves almost no
    cyclic garbage (20 objects for SD 1.5), which the next collection after it finds.
    Usable as a decorator.

    Example:
    >>> import gc
    >>> with paused_gc():
    ...     gc.isenabled()
    False
    >>> gc.isenabled()
    True
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_models_deferred(config: dict) -> dict:
    """`{StableDiffusion attribute: model}` built from `config`, variables without values.

    Every model must then go through `initialize_deferred` or `forget_deferred`.
    """
    with keras.StatelessScope(initialize_variables=False):
        return {attr: cls(**config[key]) for attr, (cls, key) in MODELS.items()}


def forget_deferred(models) -> None:
    """Drop the models' variables from Keras' list of variables awaiting initialization.

    Keras initializes that list at the next `StatelessScope` exit; models abandoned
    after an error (or already initialized here) must not be in it.
    """
    from keras.src.backend.common import global_state

    ours = {id(v) for model in models for v in model.weights}
    pending = global_state.get_global_attribute("uninitialized_variables") or []
    pending[:] = [v for v in pending if id(v) not in ours]


def initialize_deferred(models, pairs, workers: int = 1) -> None:
    """Give deferred variables their values: `pairs` of (variable, zero-argument function
    returning the value in the variable's layout and dtype).

    The value functions (file reads, casts, transposes; all release the GIL) run in
    `workers` threads a few tensors ahead of the variables they fill, so they overlap
    the Python work of creating variables while at most a handful of converted tensors
    wait in memory. One worker is the default: the backends' transposes are already
    multi-threaded, and a second worker made a full SD 1.5 load slower on 2 cores
    (4.1 s against 3.3 s).
    """
    models = list(models)
    given = {id(variable) for variable, _ in pairs}
    left = [v.path for m in models for v in m.weights if id(v) not in given]
    try:
        if left:  # a variable without a value would fail far from here, on first use
            raise ValueError(f"{len(left)} variables would stay without values: {left[:4]}")
        with ThreadPoolExecutor(workers) as pool:
            pending = deque()
            for variable, value in pairs:
                pending.append((variable, pool.submit(value)))
                if len(pending) > 2 * workers:
                    _fill(*pending.popleft())
            while pending:
                _fill(*pending.popleft())
    finally:
        forget_deferred(models)


def _fill(variable, future) -> None:
    tensor = future.result()
    # Keras calls a deferred variable's initializer once, with (shape, dtype).
    variable._initializer = lambda shape, dtype=None: tensor
    variable._deferred_initialize()


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

    The transposes run in the backend, whose blocked, multi-threaded kernels are several
    times faster than numpy's strided copy (most SD weights are transposed: every
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
    lines in cache (SD's large weights: 2.2-2.5 GB/s against numpy's 0.8-1.5 for a
    whole-tensor copy, about TensorFlow's transpose kernel's speed). The copies release
    the GIL, so threads run side by side; blocks of 64 rows rather than the fastest
    single-thread 16 because every block takes the GIL back, and while the model is
    being built that wait cost more than the copies saved (a full SD 1.5 load: 4.1-4.8 s
    with 64 or 128 rows against 4.5-6.6 s with 16 or 32). PyTorch's [O, I] and
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


__all__ = [
    "LazyTensor",
    "aligned_empty",
    "build_models_deferred",
    "convert_torch_tensor",
    "export_lazy",
    "forget_deferred",
    "initialize_deferred",
    "match_torch_state",
    "paused_gc",
    "read_safetensors",
    "stand_in",
    "to_keras_tensor",
    "transpose_into",
    "write_safetensors",
]
