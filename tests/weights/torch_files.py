"""Torch-format checkpoint files written opcode by opcode, without torch, for hostile tests.

A pickle is assembled from the opcodes of protocol 2 (the ones `torch.save` uses), so a
test can state any size, stride, memo index or global it wants to try on the reader.
"""

import io
import struct
import zipfile

import numpy as np

PROTO = b"\x80\x02"
STOP = b"."


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def integer(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def tuple_of(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def list_of(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def dict_of(items: dict) -> bytes:
    return b"}(" + b"".join(text(k) + v for k, v in items.items()) + b"u"


def global_ref(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def call(module: str, name: str, *args: bytes) -> bytes:
    return global_ref(module, name) + tuple_of(*args) + b"R"


def put(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)  # LONG_BINPUT


def get(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)  # LONG_BINGET


def storage(key: str, numel: int, kind: str = "FloatStorage", legacy: bool = False) -> bytes:
    fields = [text("storage"), global_ref("torch", kind), text(key), text("cpu"), integer(numel)]
    if legacy:
        fields.append(b"N")  # no view
    return tuple_of(*fields) + b"Q"  # BINPERSID


def tensor(storage_ops: bytes, offset: int, size, stride) -> bytes:
    return call(
        "torch._utils",
        "_rebuild_tensor_v2",
        storage_ops,
        integer(offset),
        tuple_of(*map(integer, size)),
        tuple_of(*map(integer, stride)),
        b"\x89",  # requires_grad False
        call("collections", "OrderedDict"),
    )


def contiguous(size) -> tuple:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def state_dict_pickle(arrays: dict, legacy: bool = False) -> tuple[bytes, dict]:
    """A pickle of `{"state_dict": {name: tensor}}` and `{storage key: bytes}`."""
    entries, blobs = {}, {}
    for i, (name, array) in enumerate(arrays.items()):
        kind = {"float32": "FloatStorage", "float16": "HalfStorage", "int64": "LongStorage"}
        ops = storage(str(i), array.size, kind[array.dtype.name], legacy)
        entries[name] = tensor(ops, 0, array.shape, contiguous(array.shape))
        blobs[str(i)] = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    body = dict_of({"state_dict": dict_of(entries), "global_step": integer(7)})
    return PROTO + body + STOP, blobs


def write_zip(path, pickle_bytes: bytes, blobs: dict, compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
        for key, data in blobs.items():
            archive.writestr(f"archive/data/{key}", data)


def write_legacy(path, pickle_bytes: bytes, blobs: dict) -> None:
    out = io.BytesIO()
    out.write(PROTO + integer(0x1950A86A20F9469CFC6C) + STOP)
    out.write(PROTO + integer(1001) + STOP)
    out.write(PROTO + dict_of({"little_endian": b"\x88", "protocol_version": integer(1001)}))
    out.write(STOP)
    out.write(pickle_bytes)
    out.write(PROTO + list_of(*(text(k) for k in blobs)) + STOP)
    for data in blobs.values():
        itemsize = 4  # the tests' legacy files hold float32 storages only
        out.write(struct.pack("<q", len(data) // itemsize) + data)
    path.write_bytes(out.getvalue())
