"""Mutations of valid checkpoint files for the fuzzer (test_fuzz_checkpoints.py): each
takes the bytes or contents of a file and a `random.Random` and returns an edited copy.
"""

import json
import pickletools
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch_files as tf

_OPCODES = [op.code.encode("latin-1") for op in pickletools.opcodes]


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


VALUES = [0, -1, 1, 3, 2**31, 2**40, 2**63, -(2**63), 1.5, "F32", "x", None, [], {}, [1, -1], True]


def header_edit(data: bytes, rng: random.Random) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
    names = [k for k in header if k != "__metadata__"]
    name, other = rng.choice(names), rng.choice(names)
    entry = header[name]
    choice = rng.randrange(10)
    if choice == 0:
        entry["dtype"] = rng.choice(
            ["F32", "I32", "F16", "BF16", "U8", "F64", "I64", "BOOL", "Q", 3]
        )
    elif choice == 1:
        entry["shape"] = rng.choice([[], [0], [10**12], [2**62, 4], [-4], [4.0], "4", [1] * 64])
    elif choice == 2:
        entry["data_offsets"] = list(header[other]["data_offsets"])  # overlap another
    elif choice == 3:
        begin, end = entry["data_offsets"]
        shift = rng.choice([-8, -2, 2, 8, 2**40])
        entry["data_offsets"] = rng.choice([[begin + shift, end + shift], [begin, end + shift]])
    elif choice == 4:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(VALUES)
    elif choice == 5:
        del header[name]
    elif choice == 6:
        header["__metadata__"] = rng.choice(
            [[], {"format": 3}, "pt", {"k": None}, {"format": "pt"}]
        )
    elif choice == 7:
        header[name + ".copy"] = dict(entry)
    elif choice == 8:
        header = rng.choice([[], "x", None, 3, {"a": None}])
    else:
        blob = json.dumps(header).encode()
        return (
            struct.pack("<Q", rng.choice([0, 2, len(blob) - 1, len(blob) + 1, 2**63])) + blob + body
        )
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


def opcode_positions(pickle_bytes: bytes) -> list:
    return [(op.name, pos) for op, _, pos in pickletools.genops(pickle_bytes)]


HOSTILE_OPS = [
    b"r" + struct.pack("<I", 2**32 - 1),  # LONG_BINPUT far beyond the memo
    b"\x8e" + struct.pack("<Q", 2**40),  # BINBYTES8 of 1 TB
    b"X" + struct.pack("<I", 2**31),  # BINUNICODE of 2 GB
    b"\x96" + struct.pack("<Q", 2**40),  # BYTEARRAY8 of 1 TB
    b"cbuiltins\nbytearray\n(J\x00\x00\x00\x40tR",  # bytearray(2**30)
    b"cposix\nsystem\n(X\x04\x00\x00\x00truetR",
    b"cbuiltins\neval\n",
    b"(" * 5000 + b"]" * 5000,
    b"\x95" + struct.pack("<Q", 2**50),  # FRAME of a petabyte
    b"j" + struct.pack("<I", 2**31),  # LONG_BINGET of a missing entry
]


def pickle_edit(pickle_bytes: bytes, rng: random.Random) -> bytes:
    ops = opcode_positions(pickle_bytes)
    index = rng.randrange(len(ops) - 1)
    name, pos = ops[index]
    end = ops[index + 1][1]
    choice = rng.randrange(6)
    if choice == 0:
        return pickle_bytes[:pos] + rng.choice(_OPCODES) + pickle_bytes[pos + 1 :]
    if choice == 1:
        ints = [p for n, p in ops if n == "BININT"]
        if ints:
            at = rng.choice(ints)
            value = rng.choice([0, -1, 2**31 - 1, -(2**31), rng.randrange(-1000, 1000)])
            return pickle_bytes[: at + 1] + struct.pack("<i", value) + pickle_bytes[at + 5 :]
    if choice == 2:
        return pickle_bytes[:pos] + pickle_bytes[end:]
    if choice == 3:
        return pickle_bytes[:end] + pickle_bytes[pos:end] * rng.randint(1, 40) + pickle_bytes[end:]
    if choice == 4:
        return pickle_bytes[:pos] + rng.choice(HOSTILE_OPS) + pickle_bytes[pos:]
    return flip(pickle_bytes, rng)


def central_records(data: bytes) -> list:
    records, at = [], data.find(b"PK\x01\x02")
    while at >= 0:
        records.append(at)
        at = data.find(b"PK\x01\x02", at + 1)
    return records


def zip_edit(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    records = central_records(data)
    if not records:
        return flip(data, rng)
    at = rng.choice(records)
    field, width = rng.choice([(10, "H"), (20, "I"), (24, "I"), (28, "H"), (42, "I")])
    value = rng.choice([0, 1, 8, 12, 99, 2**16 - 1, 2**31, 2**32 - 1, len(data), len(data) * 2000])
    value %= 2 ** (16 if width == "H" else 32)
    struct.pack_into("<" + width, out, at + field, value)
    if rng.random() < 0.3:  # the local header too
        local = struct.unpack_from("<I", out, at + 42)[0]
        if local + 30 <= len(out) and out[local : local + 4] == b"PK\x03\x04":
            struct.pack_into("<I", out, local + rng.choice([18, 22]), value % 2**32)
    return bytes(out)


def rezip(path: Path, pickle_bytes: bytes, blobs: dict, rng: random.Random) -> None:
    blobs = dict(blobs)
    choice = rng.randrange(4)
    if choice == 0 and blobs:
        del blobs[rng.choice(sorted(blobs))]
    elif choice == 1 and blobs:
        key = rng.choice(sorted(blobs))
        blobs[key] = blobs[key][: rng.randrange(len(blobs[key]) + 1)]
    elif choice == 2:
        blobs["../../escape"] = b"\0" * 16
    compression = zipfile.ZIP_DEFLATED if choice == 3 else zipfile.ZIP_STORED
    tf.write_zip(path, pickle_bytes, blobs, compression)


def config_edit(metadata: dict, rng: random.Random) -> dict:
    config = json.loads(metadata["config"])
    component = rng.choice(["text_encoder", "unet", "vae", "tokenizer", "scheduler"])
    keys = sorted(config.setdefault(component, {})) or ["x"]
    choice = rng.randrange(5)
    if choice == 0:
        config[component][rng.choice(keys)] = rng.choice(
            [0, -1, 1.5, "x", None, [], {}, True, [8], 10**5, 4 * 10**8, 2**62]
        )
    elif choice == 1:
        config[component].pop(rng.choice(keys), None)
    elif choice == 2:
        config[component] = rng.choice([[], "x", None, 3])
    elif choice == 3:
        config["tokenizer"] = {"vocab_path": rng.choice(["/dev/zero", "/etc/passwd", "/dev/stdin"])}
    else:
        del config[component]
    return {**metadata, "config": json.dumps(config)}


def compvis_edit(state: dict, rng: random.Random) -> dict:
    """Key and shape edits that reach the CompVis layout detection and key mapping."""
    state, key = dict(state), rng.choice(sorted(state))
    choice = rng.randrange(5)
    if choice == 0:
        digits = [p for p in key.split(".") if p.isdigit()] or ["0"]
        new = key.replace(f".{rng.choice(digits)}.", f".{rng.choice([7, 99999, 2**31])}.", 1)
        state[new] = state.pop(key)
    elif choice == 1:
        del state[key]
    elif choice == 2:
        state[key] = rng.choice([np.zeros((10**6, 0), "float32"), state[key].reshape(-1)])
    elif choice == 3:
        state[key] = state[key].astype(rng.choice(["float16", "int32", "float64"]))
    else:
        state[f"model.diffusion_model.input_blocks.{rng.choice([12, 99999])}.0.op.weight"] = (
            np.zeros((8, 8, 3, 3), "float32")
        )
    return state
