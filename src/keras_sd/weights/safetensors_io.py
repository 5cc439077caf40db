"""Safetensors files read lazily and written a tensor at a time.

`read_safetensors` parses the header only and returns `LazyTensor`s whose shape and
dtype are known at once and whose values are read (with plain file reads, no memory
map, so the page cache is not charged to the process) when a consumer asks for them;
`LazyTensor.mapped` hands out a memory map of the stored values instead, for
consumers that copy them at once. `write_safetensors` writes the header from shapes
and dtypes, then each tensor in turn, to a temporary file renamed into place when
complete. The format: 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian bytes (https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from keras_sd.backend.memory import aligned_empty
from keras_sd.weights.atomic import partial_path
from keras_sd.weights.state_dict import CheckpointError, stand_in

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
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
_TAGS = {np.dtype(v).name: k for k, v in _DTYPES.items() if k != "BF16"}
_TAGS["bfloat16"] = "BF16"  # written from ml_dtypes' bfloat16, Keras' numpy bfloat16
_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library enforces


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32, so widening is exact.
    return (bits.astype(np.uint32) << 16).view(np.float32)


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


def _unreadable(path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path} as a safetensors file: {reason}. The file may be truncated "
        "(an interrupted download?), corrupted, or not a safetensors file at all."
    )


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

    The header is validated as a whole first (each entry's offsets hold exactly its
    shape in its dtype, the entries tile the data without gaps or overlaps, and the
    data end where the file ends), so a truncated or inconsistent file fails here with
    a clear message instead of at some later read or as wrong values.
    BF16 tensors are widened to float32 (exactly) when read.

    Raises:
        FileNotFoundError: `path` does not exist.
        CheckpointError: (a ValueError) a malformed or inconsistent header, or a file
            whose length is not what its header says.

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
        except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, absurd nesting
            raise _unreadable(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _unreadable(path, "the __metadata__ entry is not an object of strings")
    start = 8 + length
    entries = sorted((_header_entry(path, name, info), name) for name, info in header.items())
    # As the safetensors library demands: the tensors tile the data without gaps or
    # overlaps up to the end of the file, so no byte is read as two tensors.
    position = 0
    for (begin, end, _, _), name in entries:
        if begin != position:
            raise _unreadable(
                path,
                f"tensor {name!r} starts at data byte {begin}, expected {position} "
                "(tensors must follow each other without gaps or overlaps)",
            )
        position = end
    if start + position != size:
        raise _unreadable(
            path, f"the last tensor ends at byte {start + position} but the file has {size} bytes"
        )
    tensors = {}
    for (begin, _, tag, shape), name in entries:
        dtype, bfloat16 = np.dtype(_DTYPES[tag]), tag == "BF16"
        tensors[name] = LazyTensor(
            _TensorReader(path, start + begin, dtype.str, shape, bfloat16),
            shape,
            np.float32 if bfloat16 else dtype,
        )
    return tensors, metadata


def _header_entry(path, name: str, info) -> tuple[int, int, str, tuple]:
    """`(begin, end, dtype tag, shape)` of one header entry, checked on its own."""
    try:
        tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        dtype = np.dtype(_DTYPES[tag])
        numbers = [*shape, begin, end]
    except (KeyError, TypeError, ValueError):
        raise _unreadable(path, f"invalid header entry for {name!r}: {info!r:.200}") from None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise _unreadable(path, f"invalid header entry for {name!r}: {info!r:.200}")
    if begin > end or end - begin != math.prod(shape) * dtype.itemsize:
        raise _unreadable(
            path,
            f"tensor {name!r} has inconsistent offsets {[begin, end]} for "
            f"{tag} values of shape {list(shape)}",
        )
    return begin, end, tag, tuple(shape)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, so readers never see a partial file."""
    path = Path(path)
    partial = partial_path(path)
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
        dtype: None keeps each tensor's dtype (bfloat16 too); "float16"/"float32"
            converts the floating-point ones.
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
        floating = source.kind == "f" or source.name == "bfloat16"
        target = np.dtype(dtype) if dtype and floating else source
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
    partial = partial_path(path)
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
