"""Read PyTorch checkpoints (`.ckpt`, `.bin`, `.pt`, `.pth`) without torch and without running code.

`torch.save` writes a pickle whose only globals, for a plain state dict, are a
tensor-rebuild function, storage type names and `collections.OrderedDict`; the
tensor bytes live outside the pickle (zip entries `<archive>/data/<key>` since
torch 1.6, or appended after the pickle in the legacy format). A normal
`pickle.load` would import and call whatever globals the file names, which is
how malicious checkpoints run code. Here the unpickler of
`keras_sd.weights.torch_pickle` maps the few allowed names to our own harmless
functions and refuses everything else, so nothing from the file is ever imported
or called. Nothing a file states is trusted as a size either: every allocation is
bounded by the bytes the file really holds (zip entries checked against the
archive, storages against their entries, copies against the storages).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from keras_sd.weights.safetensors_io import _bfloat16_to_float32, read_safetensors
from keras_sd.weights.state_dict import CheckpointError
from keras_sd.weights.torch_pickle import (
    BFLOAT16,
    BoundedReader,
    RestrictedUnpickler,
    Storage,
    TensorSpec,
    UnsafeCheckpointError,
    check_pickle,
)

# The legacy (pre-zip) format starts with this number, pickled.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_EXTENSIONS_TORCH = (".ckpt", ".bin", ".pt", ".pth")
_EXTENSIONS_ALL = (".safetensors", *_EXTENSIONS_TORCH)

# Deflate cannot expand data more than about 1032-fold, so a zip entry's stated size
# beyond this times its stored bytes is a lie meant to make us allocate it.
_MAX_DEFLATE_RATIO = 1100
# Non-contiguous tensor views are copied; all copies together may take at most this
# much beyond the storage bytes the file really holds.
_COPY_SLACK = 1 << 20


def _storage_array(buffer, storage: Storage, byteorder: str) -> np.ndarray:
    """The storage's elements from its bytes, native byte order, bfloat16 widened once
    (so every tensor viewing it shares the widened copy)."""
    dtype = storage.type.dtype.newbyteorder("<" if byteorder == "little" else ">")
    nbytes = storage.numel * dtype.itemsize
    if len(buffer) < nbytes:
        raise ValueError(f"storage holds {len(buffer)} bytes, expected {nbytes}: file truncated")
    array = np.frombuffer(buffer, dtype=dtype, count=storage.numel)
    array = array if dtype.isnative else array.astype(dtype.newbyteorder("="))
    return _bfloat16_to_float32(array) if storage.type.name == BFLOAT16 else array


def _is_contiguous(size: tuple, stride: tuple) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride), strict=True):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


class _Materializer:
    """Replaces every `TensorSpec` in nested dicts/lists/tuples by a numpy array.

    Each object is converted once however often the pickle refers to it (a pickle's
    memo can make a tiny file refer to one object billions of times), so shared
    containers and tensors stay shared. Contiguous views share their storage's memory;
    the others are copied, all copies together within `budget` bytes, and views that
    repeat elements (stride 0 beyond the storage's size) are refused.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.done: dict[int, Any] = {}

    def __call__(self, obj):
        if isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return obj
        key = id(obj)
        if key not in self.done:
            self.done[key] = self._convert(obj)
        return self.done[key]

    def _tensor(self, spec: TensorSpec) -> np.ndarray:
        flat, count = spec.storage.data, math.prod(spec.size)
        if count > spec.storage.numel:
            raise ValueError(
                f"a tensor of size {spec.size} (stride {spec.stride}) repeats the elements of "
                f"its storage of {spec.storage.numel}: refusing to expand it"
            )
        if count == 0 or _is_contiguous(spec.size, spec.stride):
            return flat[spec.offset : spec.offset + count].reshape(spec.size)
        self.budget -= count * flat.dtype.itemsize
        if self.budget < 0:
            raise ValueError("the tensor views copy more bytes than the file holds")
        view = np.lib.stride_tricks.as_strided(
            flat[spec.offset :],
            shape=spec.size,
            strides=[s * flat.dtype.itemsize for s in spec.stride],
            writeable=False,
        )
        return np.array(view)

    def _convert(self, obj):
        if isinstance(obj, TensorSpec):
            return self._tensor(obj)
        if isinstance(obj, dict):
            out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
            self.done[id(obj)] = out  # a dict that contains itself stays finite
            for key, value in obj.items():
                out[self(key)] = self(value)
            return out
        if isinstance(obj, list):
            out = []
            self.done[id(obj)] = out
            out.extend(self(v) for v in obj)
            return out
        if isinstance(obj, tuple):
            return tuple(self(v) for v in obj)
        return obj


def _materialize(obj, storages: dict):
    real = sum(storage.data.nbytes for storage in storages.values())
    return _Materializer(real + _COPY_SLACK)(obj)


def _check_entry(info: zipfile.ZipInfo, archive_size: int) -> None:
    """Refuse a zip entry whose stated sizes the archive cannot hold."""
    if info.compress_type == zipfile.ZIP_STORED:
        plausible = info.file_size == info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        plausible = info.file_size <= _MAX_DEFLATE_RATIO * info.compress_size + 64
    else:
        raise ValueError(f"zip entry {info.filename!r} uses an unsupported compression method")
    if not plausible or info.header_offset + info.compress_size > archive_size:
        raise ValueError(
            f"zip entry {info.filename!r} states {info.file_size} bytes "
            f"({info.compress_size} stored) that the archive of {archive_size} bytes cannot hold"
        )


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int) -> bytearray:
    """The first `nbytes` of an entry already checked by `_check_entry`."""
    if nbytes > info.file_size:
        raise ValueError(f"zip entry {info.filename!r} holds {info.file_size} bytes, not {nbytes}")
    buffer, filled = bytearray(nbytes), 0
    with archive.open(info) as f:
        view = memoryview(buffer)
        while filled < nbytes:
            got = f.readinto(view[filled:])
            if not got:
                raise ValueError(f"zip entry {info.filename!r} is cut short")
            filled += got
    return buffer


def _load_zip(path: Path, source: str):
    archive_size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        for info in infos.values():
            _check_entry(info, archive_size)
        pickles = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{source} is a zip archive without a PyTorch data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in infos:
            info = infos[prefix + "byteorder"]
            byteorder = bytes(_read_entry(archive, info, min(info.file_size, 16))).decode()
            byteorder = byteorder.strip()
        storages: dict[str, Storage] = {}
        info = infos[pickles[0]]
        data = io.BytesIO(_read_entry(archive, info, info.file_size))
        check_pickle(data)
        obj = RestrictedUnpickler(data, source, storages, legacy=False).load()
        for key, storage in storages.items():
            entry = f"{prefix}data/{key}"
            if entry not in infos:
                raise ValueError(f"storage {entry!r} is missing from the archive")
            nbytes = storage.numel * storage.type.dtype.itemsize
            storage.data = _storage_array(
                _read_entry(archive, infos[entry], nbytes), storage, byteorder
            )
    return obj, storages


def _load_legacy(path: Path, source: str):
    storages: dict[str, Storage] = {}
    with open(path, "rb") as f:
        reader = BoundedReader(f, path.stat().st_size)

        def load():
            check_pickle(reader)
            return RestrictedUnpickler(reader, source, storages, legacy=True).load()

        if load() != _LEGACY_MAGIC or load() != _LEGACY_PROTOCOL:
            raise ValueError(f"{source} is neither a zip nor a legacy PyTorch checkpoint")
        sys_info = load()
        if not isinstance(sys_info, dict):
            raise ValueError("the legacy header's system information is not a dict")
        byteorder = "little" if sys_info.get("little_endian", True) else "big"
        obj = load()
        keys = load()
        if not isinstance(keys, list):
            raise ValueError("the legacy storage list is not a list")
        for key in keys:
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", reader.read(8))
            if numel != storage.numel or storage.data is not None:
                raise ValueError(f"storage {key!r} has {numel} elements, expected {storage.numel}")
            nbytes = numel * storage.type.dtype.itemsize
            if nbytes > reader.left():
                raise ValueError(f"storage {key!r} needs {nbytes} bytes past the end of the file")
            storage.data = _storage_array(reader.read(nbytes), storage, byteorder)
    if any(storage.data is None for storage in storages.values()):
        raise ValueError("a tensor's storage is missing from the file")
    return obj, storages


def _unreadable(path: Path, kind: str, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path} as {kind}: {str(err).rstrip('.')}. The file may be truncated "
        f"(an interrupted download?), corrupted, or not {kind} at all."
    )


def load_torch_file(path) -> dict[str, Any]:
    """Read a file written by `torch.save` without importing torch or running its code.

    Only tensors (and parameters) and plain containers are rebuilt; any other
    Python object in the file is refused. Tensors become numpy arrays with the
    same dtype and values, except bfloat16, which is widened to float32 (an
    exact conversion). Contiguous tensors that share a storage in the file share
    memory, as they would in torch; a tensor the file refers to many times is one
    array.

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
        CheckpointError: (a ValueError) the file is truncated, corrupted or not a
            PyTorch checkpoint.

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
            obj, storages = _load_zip(path, source)
        elif head == b"PK\x03\x04":
            raise ValueError("the zip archive is truncated or corrupted")
        else:
            obj, storages = _load_legacy(path, source)
        obj = _materialize(obj, storages)
    except UnsafeCheckpointError:
        raise
    except MemoryError:  # a last resort: every size is checked against the file before
        raise CheckpointError(
            f"cannot read {path}: it needs more memory than is available, far more than "
            "a checkpoint of its size should"
        ) from None
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
        NotImplementedError,  # zip features the zipfile module does not read
        OverflowError,
        zlib.error,
        LookupError,
        RecursionError,  # absurdly deep or self-referencing containers
    ) as err:
        raise _unreadable(path, "a PyTorch checkpoint", err) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
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
        ValueError: unknown extension; CheckpointError (a ValueError): a truncated,
            corrupted or non-checkpoint file.

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
        raise CheckpointError(
            f"{path} is not a flat state dict: entries {bad[:5]!r:.200} are not named tensors"
        )
    return obj


__all__ = ["UnsafeCheckpointError", "load_state_dict_file", "load_torch_file"]
