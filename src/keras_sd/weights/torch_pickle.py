"""The restricted unpickler behind `safe_pickle`: the stand-in records it builds for
tensors and storages, the only globals it resolves, and a scan of a pickle's opcodes
before it runs.

`torch.save` writes a pickle whose only globals, for a plain state dict, are a
tensor-rebuild function, storage type names and `collections.OrderedDict`. A normal
`pickle.load` would import and call whatever globals the file names, which is how
malicious checkpoints run code. Here `find_class` maps the few allowed names to our own
harmless functions and refuses everything else, so nothing from the file is ever
imported or called. CPython's unpickler also allocates what a pickle states before
checking it is there (a bytes object of a stated length, a memo table up to a stated
index), so `check_pickle` walks the opcodes first and refuses such statements.
"""

from __future__ import annotations

import collections
import functools
import pickle
import pickletools

import numpy as np

from keras_sd.weights.state_dict import CheckpointError

# torch storage class name -> numpy dtype of its elements. bfloat16 has no numpy
# dtype, so it is read as raw uint16 and widened to float32 (exactly) afterwards.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128,
    "ComplexFloatStorage": np.complex64,
}
BFLOAT16 = "BFloat16Storage"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint names a Python global that loading it safely cannot allow.

    Example:
    >>> issubclass(UnsafeCheckpointError, CheckpointError), issubclass(CheckpointError, ValueError)
    (True, True)
    """


class _Record:
    """Base of our stand-in objects: a crafted pickle must not overwrite their
    validated fields with a BUILD opcode."""

    def __setstate__(self, state):
        raise ValueError("unexpected BUILD on a tensor or storage record")


class StorageType(_Record):
    """Stands in for `torch.FloatStorage` etc.: only carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class Storage(_Record):
    """A flat typed buffer; `data` is filled when the bytes are read."""

    def __init__(self, storage_type: StorageType, numel: int):
        self.type = storage_type
        self.numel = numel
        self.data: np.ndarray | None = None


class TensorSpec(_Record):
    """A tensor described by a storage and its view; materialized after unpickling."""

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _as_int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and v >= 0 for v in value
    ):
        raise ValueError(f"invalid tensor {what}: {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    # Hooks and metadata would need other globals to be meaningful; an empty
    # OrderedDict (what torch.save writes) is all we accept.
    if not isinstance(storage, Storage) or not isinstance(storage_offset, int):
        raise ValueError("invalid tensor record: storage or offset has the wrong type")
    if backward_hooks:
        raise ValueError("tensor with backward hooks: not a plain state dict")
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if len(size) != len(stride) or storage_offset < 0:
        raise ValueError(f"invalid tensor view: size {size}, stride {stride}")
    # Bounds check so a crafted file cannot make as_strided read outside the buffer.
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise ValueError(
                f"tensor view (offset {storage_offset}, size {size}, stride {stride}) "
                f"runs past its storage of {storage.numel} elements"
            )
    return TensorSpec(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorSpec) or backward_hooks:
        raise ValueError("invalid parameter record")
    return data


def _bytearray(data=b""):
    # torch never pickles a bytearray of a size: `bytearray(n)` would allocate n bytes.
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("a bytearray record must hold bytes, not a size")
    return bytearray(data)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles store bytes as `_codecs.encode(str, "latin1")`.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise ValueError(f"unexpected bytes record: encoding {encoding!r}")
    return text.encode(encoding)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
}


# Training metadata of pytorch-lightning checkpoints (sd-v1-4.ckpt keys a dict by the
# `ModelCheckpoint` callback class) names lightning globals. They are never imported:
# each becomes an inert placeholder class, so such files load without lightning and
# without running its code; the weights never depend on them.
_INERT_MODULES = ("pytorch_lightning", "lightning")


class _InertGlobal:
    """Placeholder for a lightning class: instances accept and drop any arguments and state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


@functools.cache
def _inert_global(module: str, name: str) -> type:
    # One class per name, so a name used twice (e.g. as dict keys) stays the same object.
    return type(name, (_InertGlobal,), {"__module__": module, "__qualname__": name})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuild globals and plain containers."""

    def __init__(self, file, source: str, storages: dict, legacy: bool):
        super().__init__(file)
        self.source = source
        self.storages = storages  # key -> Storage, shared by tensors that share memory
        self.legacy = legacy

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol <= 2 pickles use Python 2 module names
            module = "builtins"
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module.split(".")[0] in _INERT_MODULES:
            return _inert_global(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load '{module}.{name}' from {self.source}: the file contains Python "
            "objects other than tensors and plain containers, and unpickling them could run "
            "arbitrary code. If you trust the file, convert it to .safetensors (load it with "
            "torch.load in an isolated environment and save its state dict with "
            "safetensors.torch.save_file) and load that instead."
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise ValueError(f"unknown persistent record {pid!r}")
        count = 6 if self.legacy else 5
        if len(pid) != count:
            raise ValueError(f"malformed storage record {pid!r}")
        storage_type, key, _location, numel, *view = pid[1:]
        if any(view):
            # Pre-1.6 torch could save views into storages; state dicts never need them.
            raise ValueError("legacy storage views are not supported")
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"malformed storage record {pid!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = Storage(storage_type, numel)
        storage = self.storages[key]
        if storage.type.dtype != storage_type.dtype or storage.numel != numel:
            raise ValueError(f"storage {key!r} is referenced with two different types or sizes")
        return storage


class BoundedReader:
    """A file read from its current position up to `end`, never asking the file for more
    than is left (a buffered `read(n)` allocates n bytes before reading)."""

    def __init__(self, file, end: int):
        self.file, self.end = file, end

    def left(self) -> int:
        return max(0, self.end - self.file.tell())

    def read(self, n: int | None = -1) -> bytes:
        left = self.left()
        return self.file.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int | None = -1) -> bytes:
        left = self.left()
        return self.file.readline(left if limit is None or limit < 0 else min(limit, left))

    def readinto(self, buffer) -> int:
        return self.file.readinto(memoryview(buffer).cast("B")[: self.left()])

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, position: int) -> int:
        return self.file.seek(position)


_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def check_pickle(reader) -> None:
    """Walk one pickle's opcodes from `reader`'s position, then go back there.

    `pickletools.genops` reads every argument it parses, so a stated length the file does
    not hold fails here instead of being allocated; memo indices above the opcode count
    (a table of that many slots) are refused.
    """
    start = reader.tell()
    for count, (opcode, arg, _) in enumerate(pickletools.genops(reader), 1):
        if opcode.name in _PUTS and (not isinstance(arg, int) or not 0 <= arg <= count):
            raise ValueError(f"pickle memo index {arg!r} at opcode {count} is out of range")
    reader.seek(start)
