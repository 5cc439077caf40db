"""Checkpoint files written by an attacker: nothing they say may make keras-sd open another
path, allocate more than they hold, or load values other than the ones they store.

Each case states its attack in a few bytes; the reader must refuse it with a
`CheckpointError` quickly and without allocating what the file claims (measured with
tracemalloc, which sees numpy's and Python's allocations).
"""

import json
import struct
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch_files as tf

from keras_sd import StableDiffusion
from keras_sd.weights import safetensors_io
from keras_sd.weights.checkpoint import save_checkpoint
from keras_sd.weights.safe_pickle import load_state_dict_file, load_torch_file
from keras_sd.weights.state_dict import CheckpointError

_OPENED: list | None = None  # paths opened while a test records them


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one only records on demand


def _opened_while(function) -> list:
    global _OPENED
    _OPENED = []
    try:
        function()
        return _OPENED
    finally:
        _OPENED = None


def _refused_cheaply(path, match: str, load=load_torch_file, limit_mb: float = 20):
    """`load(path)` raises a CheckpointError matching `match` within 2 s and `limit_mb`."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=match):
            load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2
    assert peak < limit_mb * 2**20, f"{peak / 2**20:.0f} MB allocated to refuse {path.name}"


@pytest.fixture(scope="module")
def tiny_sd():
    return StableDiffusion(img_width=32, img_height=32, jit_compile=False, config="tiny")


def _with_metadata(source, target, edit) -> None:
    tensors, metadata = safetensors_io.read_safetensors(source)
    config = json.loads(metadata["config"])
    edit(config)
    metadata = {**metadata, "config": json.dumps(config)}
    safetensors_io.write_safetensors(target, tensors, metadata=metadata, alignment=64)


@pytest.mark.parametrize("target", ["marker", "/dev/zero"])
def test_keras_layout_metadata_never_opens_a_vocabulary(tmp_path, tiny_sd, target):
    if target == "marker":
        target = tmp_path / "outside" / "vocab.txt.gz"
        target.parent.mkdir()
        target.write_bytes(b"not a vocabulary")
    saved = tmp_path / "model" / "keras.safetensors"
    saved.parent.mkdir()
    save_checkpoint(tiny_sd, saved, layout="keras")
    hostile = saved.with_name("hostile.safetensors")
    _with_metadata(saved, hostile, lambda c: c["tokenizer"].update(vocab_path=str(target)))
    stored = json.loads(safetensors_io.read_safetensors(hostile)[1]["config"])
    assert stored["tokenizer"]["vocab_path"] == str(target)

    loaded = []
    opened = _opened_while(lambda: loaded.append(StableDiffusion.from_checkpoint(hostile)))
    assert str(target) not in opened
    assert not [p for p in opened if p.startswith(str(tmp_path)) and p != str(hostile)]
    sd = loaded[0]
    assert sd.tokenizer.vocab_path is None and "vocab_path" not in sd.config["tokenizer"]
    prompt = "a red circle on a blue background"
    np.testing.assert_array_equal(sd.tokenizer([prompt]), tiny_sd.tokenizer([prompt]))
    # What it saves names no vocabulary either.
    again = tmp_path / "model" / "again.safetensors"
    save_checkpoint(sd, again, layout="keras")
    stored = json.loads(safetensors_io.read_safetensors(again)[1]["config"])
    assert "vocab_path" not in stored["tokenizer"]


def test_zip_entry_names_are_never_paths(tmp_path):
    marker = tmp_path / "marker"
    np.arange(4, dtype="<f4").tofile(marker)
    path = tmp_path / "inner" / "model.ckpt"
    path.parent.mkdir()
    view = tf.tensor(tf.storage("../../marker", 4), 0, (4,), (1,))
    tf.write_zip(path, tf.PROTO + tf.dict_of({"w": view}) + tf.STOP, {})
    opened = _opened_while(lambda: pytest.raises(CheckpointError, load_torch_file, path))
    assert opened and set(opened) == {str(path)}


def test_stride_zero_views_are_not_expanded(tmp_path):
    path = tmp_path / "broadcast.ckpt"
    view = tf.tensor(tf.storage("0", 1), 0, (24000, 24000), (0, 0))
    tf.write_zip(path, tf.PROTO + tf.dict_of({"w": view}) + tf.STOP, {"0": b"\0\0\x80?"})
    _refused_cheaply(path, "repeats the elements")


def test_shared_objects_stay_shared(tmp_path):
    # Each list holds the previous one twice: 2**40 references in a file of 1 KB.
    ops = tf.tensor(tf.storage("0", 2), 0, (2,), (1,)) + tf.put(0) + b"0"  # POP
    for level in range(1, 41):
        ops += tf.list_of(tf.get(level - 1), tf.get(level - 1)) + tf.put(level) + b"0"
    path = tmp_path / "fanout.ckpt"
    body = tf.dict_of({"x": ops + tf.get(40)})
    tf.write_zip(path, tf.PROTO + body + tf.STOP, {"0": b"\0" * 8})
    start = time.perf_counter()
    tree = load_torch_file(path)["x"]
    assert time.perf_counter() - start < 2
    depth = 0
    while isinstance(tree, list):
        assert len(tree) == 2 and tree[0] is tree[1]  # one list, not two copies
        tree, depth = tree[0], depth + 1
    assert depth == 40
    np.testing.assert_array_equal(tree, np.zeros(2, "float32"))


def test_contiguous_views_share_their_storage(tmp_path):
    path = tmp_path / "shared.ckpt"
    store = tf.storage("0", 6) + tf.put(0)
    items = {
        "whole": tf.tensor(store, 0, (2, 3), (3, 1)),
        "tail": tf.tensor(tf.get(0), 2, (4,), (1,)),
        "transposed": tf.tensor(tf.get(0), 0, (3, 2), (1, 3)),
    }
    values = np.arange(6, dtype="<f4")
    tf.write_zip(path, tf.PROTO + tf.dict_of(items) + tf.STOP, {"0": values.tobytes()})
    loaded = load_torch_file(path)
    np.testing.assert_array_equal(loaded["tail"], values[2:])
    np.testing.assert_array_equal(loaded["transposed"], values.reshape(2, 3).T)
    assert np.shares_memory(loaded["whole"], loaded["tail"])
    assert not np.shares_memory(loaded["whole"], loaded["transposed"])


def _storage_zip(path, numel: int, data: bytes, compression=zipfile.ZIP_STORED):
    view = tf.tensor(tf.storage("0", numel), 0, (numel,), (1,))
    tf.write_zip(path, tf.PROTO + tf.dict_of({"w": view}) + tf.STOP, {"0": data}, compression)


def _patch_central_sizes(path, entry: str, stored: int | None, size: int) -> None:
    """Make the central directory state other sizes for `entry` (stored: None keeps it)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while data[at + 46 : at + 46 + struct.unpack_from("<H", data, at + 28)[0]] != entry.encode():
        at = data.find(b"PK\x01\x02", at + 1)
    stored = struct.unpack_from("<I", data, at + 20)[0] if stored is None else stored
    struct.pack_into("<II", data, at + 20, stored, size)
    path.write_bytes(bytes(data))


def test_zip_sizes_beyond_the_archive_are_refused(tmp_path):
    path = tmp_path / "claims.ckpt"
    _storage_zip(path, 2**29, b"\0" * 16)  # storage of 2 GB, entry of 16 bytes
    _refused_cheaply(path, "holds 16 bytes")
    _storage_zip(path, 4, b"\0" * 16)
    _patch_central_sizes(path, "archive/data/0", 2**31, 2**31)
    _refused_cheaply(path, "cannot hold")
    # Deflate expands at most ~1032-fold: a larger ratio is a lie.
    _storage_zip(path, 4, b"\0" * 16, zipfile.ZIP_DEFLATED)
    _patch_central_sizes(path, "archive/data/0", None, 2**31)
    _refused_cheaply(path, "cannot hold")


@pytest.mark.parametrize(
    "body, match",
    [
        (tf.call("builtins", "bytearray", tf.integer(2**40)), "bytearray"),
        (b"\x8e" + struct.pack("<Q", 2**40) + b"abc", "bytes8|only 3 remain"),  # BINBYTES8
        (b"N" + tf.put(2**32 - 2), "memo index"),
        (tf.call("posix", "system", tf.text("echo hacked")), "posix.system"),
    ],
    ids=["bytearray", "binbytes8", "memo", "global"],
)
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pickles_stating_sizes_they_do_not_hold_are_refused(tmp_path, body, match, layout):
    path = tmp_path / "claims.ckpt"
    pickle_bytes = tf.PROTO + tf.dict_of({"x": body}) + tf.STOP
    (tf.write_zip if layout == "zip" else tf.write_legacy)(path, pickle_bytes, {})
    _refused_cheaply(path, match)


def test_legacy_storage_sizes_beyond_the_file_are_refused(tmp_path):
    path = tmp_path / "legacy.ckpt"
    view = tf.tensor(tf.storage("0", 2**30, legacy=True), 0, (2**30,), (1,))
    tf.write_legacy(path, tf.PROTO + tf.dict_of({"w": view}) + tf.STOP, {"0": b"\0" * 16})
    data = bytearray(path.read_bytes())
    struct.pack_into("<q", data, len(data) - 24, 2**30)  # the storage's own size record
    path.write_bytes(bytes(data))
    _refused_cheaply(path, "past the end of the file")


def _safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize(
    "offsets, size, match",
    [
        (([0, 16], [0, 16]), 16, "starts at data byte 0, expected 16"),  # overlap
        (([0, 16], [8, 24]), 24, "starts at data byte 8, expected 16"),  # partial overlap
        (([0, 16], [24, 40]), 40, "starts at data byte 24, expected 16"),  # gap
        (([0, 16], [16, 32]), 40, "file has"),  # trailing bytes
    ],
    ids=["same", "overlap", "gap", "trailing"],
)
def test_safetensors_offsets_must_tile_the_file(tmp_path, offsets, size, match):
    header = {
        name: {"dtype": "F32", "shape": [4], "data_offsets": list(span)}
        for name, span in zip("ab", offsets, strict=True)
    }
    path = tmp_path / "tiles.safetensors"
    _safetensors(path, header, bytes(size))
    _refused_cheaply(path, match, load=load_state_dict_file)


def test_weights_stored_as_integers_are_refused(tmp_path, tiny_sd):
    path = tmp_path / "model.safetensors"
    save_checkpoint(tiny_sd, path)
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = "model.diffusion_model.out.2.weight"
    header[key]["dtype"] = "I32"  # same size: only the dtype lies
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    path.write_bytes(bytes(data[:8]) + blob + bytes(data[8 + length :]))
    with pytest.raises(CheckpointError, match=r"non-floating dtypes: conv_out.weight \(int32\)"):
        StableDiffusion.from_checkpoint(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.update({"model.diffusion_model.input_blocks.0.0.weight": np.zeros(8, "f4")}),
        lambda s: s.update(
            {
                "model.diffusion_model.input_blocks.99999.0.op.weight": s.pop(
                    "model.diffusion_model.input_blocks.3.0.op.weight"
                )
            }
        ),
        lambda s: s.update({"model.diffusion_model.out.2.weight": np.zeros((10**9, 0), "f4")}),
    ],
    ids=["vector-kernel", "far-block-index", "zero-size-giant"],
)
def test_compvis_layouts_no_sd_has_are_refused(tmp_path, tiny_sd, edit):
    path = tmp_path / "model.safetensors"
    save_checkpoint(tiny_sd, path)
    state = {k: v.read() for k, v in safetensors_io.read_safetensors(path)[0].items()}
    edit(state)
    safetensors_io.write_safetensors(path, state)
    _refused_cheaply(path, "model.safetensors", load=StableDiffusion.from_checkpoint, limit_mb=200)
