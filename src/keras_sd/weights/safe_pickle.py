"""Read PyTorch checkpoints (`.ckpt`, `.bin`, `.pt`, `.pth`) without torch and without running code.

`torch.save` writes a pickle whose only globals, for a plain state dict, are a
tensor-rebuild function, storage type names and `collections.OrderedDict`; the
tensor bytes live outside the pickle (zip entries `<archive>/data/<key>` since
torch 1.6, or appended after the pickle in the legacy format). A normal
`pickle.load` would import and call whatever globals the file names, which is
how malicious checkpoints run code. Here `find_class` maps the few allowed
names to our own harmless functions and refuses everything else, so nothing
from the file is ever imported or called.
"""

from __future__ import annotations

import collections
import functools
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from keras_sd.weights.safetensors_io import _bfloat16_to_float32, read_safetensors

# torch storage class name -> numpy dtype of its elements. bfloat16 has no numpy
# dtype, so it is read as raw uint16 and widened to float32 (exactly) afterwards.
_STORAGE_DTYPES = {
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
_BFLOAT16 = "BFloat16Storage"

# The legacy (pre-zip) format starts with this number, pickled.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_EXTENSIONS_TORCH = (".ckpt", ".bin", ".pt", ".pth")
_EXTENSIONS_ALL = (".safetensors", *_EXTENSIONS_TORCH)


class UnsafeCheckpointError(ValueError):
    """A checkpoint names a Python global that loading it safely cannot allow.

    Example:
    >>> issubclass(UnsafeCheckpointError, ValueError)
    True
    """


class _Record:
    """Base of our stand-in objects: a crafted pickle must not overwrite their
    validated fields with a BUILD opcode."""

    def __setstate__(self, state):
        raise ValueError("unexpected BUILD on a tensor or storage record")


class _StorageType(_Record):
    """Stands in for `torch.FloatStorage` etc.: only carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage(_Record):
    """A flat typed buffer; `data` is filled when the bytes are read."""

    def __init__(self, storage_type: _StorageType, numel: int):
        self.type = storage_type
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorSpec(_Record):
    """A tensor described by a storage and its view; materialized after unpickling."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
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
    if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
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
    return _TensorSpec(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, _TensorSpec) or backward_hooks:
        raise ValueError("invalid parameter record")
    return data


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
    ("builtins", "bytearray"): bytearray,
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


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuild globals and plain containers."""

    def __init__(self, file, source: str, storages: dict, legacy: bool):
        super().__init__(file)
        self.source = source
        self.storages = storages  # key -> _Storage, shared by tensors that share memory
        self.legacy = legacy

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol <= 2 pickles use Python 2 module names
            module = "builtins"
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
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
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"malformed storage record {pid!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, numel)
        storage = self.storages[key]
        if storage.type.dtype != storage_type.dtype or storage.numel != numel:
            raise ValueError(f"storage {key!r} is referenced with two different types or sizes")
        return storage


def _buffer_to_array(buffer, storage: _Storage, byteorder: str) -> np.ndarray:
    dtype = storage.type.dtype.newbyteorder("<" if byteorder == "little" else ">")
    nbytes = storage.numel * dtype.itemsize
    if len(buffer) < nbytes:
        raise ValueError(f"storage holds {len(buffer)} bytes, expected {nbytes}: file truncated")
    array = np.frombuffer(buffer, dtype=dtype, count=storage.numel)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _materialize(obj):
    """Replace every `_TensorSpec` in nested dicts/lists/tuples by a numpy array."""
    if isinstance(obj, _TensorSpec):
        flat = obj.storage.data
        itemsize = flat.dtype.itemsize
        whole = obj.offset == 0 and int(np.prod(obj.size)) == flat.size
        contiguous = obj.stride == tuple(
            int(np.prod(obj.size[i + 1 :])) for i in range(len(obj.size))
        )
        if whole and contiguous:
            array = flat.reshape(obj.size)  # a view: tensors sharing a storage share memory
        else:
            view = np.lib.stride_tricks.as_strided(
                flat[obj.offset :],
                shape=obj.size,
                strides=[s * itemsize for s in obj.stride],
                writeable=False,
            )
            array = np.array(view)
        if obj.storage.type.name == _BFLOAT16:
            array = _bfloat16_to_float32(array)
        return array
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _materialize(value)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _load_zip(path: Path, source: str):
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{source} is a zip archive without a PyTorch data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages: dict[str, _Storage] = {}
        with archive.open(pickles[0]) as f:
            obj = _RestrictedUnpickler(f, source, storages, legacy=False).load()
        for key, storage in storages.items():
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise ValueError(f"storage {entry!r} is missing from the archive")
            buffer = bytearray(archive.getinfo(entry).file_size)
            with archive.open(entry) as f:
                f.readinto(buffer)
            storage.data = _buffer_to_array(buffer, storage, byteorder)
    return obj


def _load_legacy(path: Path, source: str):
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:

        def load():
            return _RestrictedUnpickler(f, source, storages, legacy=True).load()

        if load() != _LEGACY_MAGIC or load() != _LEGACY_PROTOCOL:
            raise ValueError(f"{source} is neither a zip nor a legacy PyTorch checkpoint")
        sys_info = load()
        byteorder = "little" if sys_info.get("little_endian", True) else "big"
        obj = load()
        keys = load()
        for key in keys:
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", f.read(8))
            if numel != storage.numel:
                raise ValueError(f"storage {key!r} has {numel} elements, expected {storage.numel}")
            storage.data = _buffer_to_array(
                f.read(numel * storage.type.dtype.itemsize), storage, byteorder
            )
    return obj


def _unreadable(path: Path, kind: str, err: Exception) -> ValueError:
    return ValueError(
        f"cannot read {path} as {kind}: {str(err).rstrip('.')}. The file may be truncated "
        f"(an interrupted download?), corrupted, or not {kind} at all."
    )


def load_torch_file(path) -> dict[str, Any]:
    """Read a file written by `torch.save` without importing torch or running its code.

    Only tensors (and parameters) and plain containers are rebuilt; any other
    Python object in the file is refused. Tensors become numpy arrays with the
    same dtype and values, except bfloat16, which is widened to float32 (an
    exact conversion). Tensors that share a storage in the file and each cover
    all of it share memory, as they would in torch.

    Args:
        path: a `.ckpt`/`.bin`/`.pt`/`.pth` file (zip format of torch >= 1.6, or the
            legacy format).

    Returns:
        The unpickled top-level dict, with every tensor replaced by an `np.ndarray`
        (for SD checkpoints: `{"state_dict": {...}, "global_step": ...}`).

    Raises:
        FileNotFoundError: `path` does not exist.
        UnsafeCheckpointError: the file names a global that is not a tensor builder
            or plain container (e.g. `posix.system`). pytorch-lightning classes in
            training metadata become inert placeholders instead.
        ValueError: the file is truncated, corrupted or not a PyTorch checkpoint.

    Example:
    >>> ckpt = load_torch_file("v1-5-pruned-emaonly.ckpt")  # doctest: +SKIP
    >>> ckpt["state_dict"]["model.diffusion_model.out.2.bias"].shape  # doctest: +SKIP
    (4,)
    """
    path = Path(path)
    source = path.name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if zipfile.is_zipfile(path):
            obj = _load_zip(path, source)
        elif head == b"PK\x03\x04":
            raise ValueError("the zip archive is truncated or corrupted")
        else:
            obj = _load_legacy(path, source)
        obj = _materialize(obj)
    except UnsafeCheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        struct.error,
        UnicodeDecodeError,
        OSError,
        RecursionError,  # absurdly deep or self-referencing containers
    ) as err:
        raise _unreadable(path, "a PyTorch checkpoint", err) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    tensors, _ = read_safetensors(path)  # bfloat16 widened to float32, exactly
    return {key: tensors[key].read() for key in sorted(tensors)}


def load_state_dict_file(path) -> dict[str, np.ndarray]:
    """Load a flat `{name: np.ndarray}` state dict from a checkpoint file.

    `.safetensors` files are read with `safetensors_io.read_safetensors`; `.ckpt`,
    `.bin`, `.pt` and `.pth` files with `load_torch_file`. A top-level
    `"state_dict"` entry (CompVis/Lightning checkpoints) is unwrapped and the
    metadata beside it (`global_step`, ...) dropped.

    Args:
        path: the checkpoint file.

    Returns:
        `{name: np.ndarray}` in the file's own key layout.

    Raises:
        FileNotFoundError: `path` does not exist.
        UnsafeCheckpointError: a pickle-based file holds objects other than tensors.
        ValueError: unknown extension, or a truncated, corrupted or non-checkpoint file.

    Example:
    >>> sd = load_state_dict_file("v1-5-pruned-emaonly.safetensors")  # doctest: +SKIP
    >>> sd["model.diffusion_model.input_blocks.0.0.weight"].shape  # doctest: +SKIP
    (320, 4, 3, 3)
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS_ALL:
        raise ValueError(
            f"unsupported checkpoint extension {suffix!r} for {path}; "
            f"expected one of {', '.join(_EXTENSIONS_ALL)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if suffix == ".safetensors":
        try:
            return _load_safetensors(path)
        except ValueError:  # names the file and what is wrong with it
            raise
        except Exception as err:
            raise _unreadable(path, "a safetensors file", err) from None
    obj = load_torch_file(path)
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(
            f"{path} is not a flat state dict: entries {bad[:5]} are not named tensors"
        )
    return obj


__all__ = ["UnsafeCheckpointError", "load_state_dict_file", "load_torch_file"]
