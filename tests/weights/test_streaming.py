"""Lazy safetensors reading/writing and deferred models (checked against the safetensors
library and `state_dict.torch_to_keras`)."""

import gc
import json
import struct

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from keras_sd import presets
from keras_sd.weights import deferred, safetensors_io, transpose
from keras_sd.weights.state_dict import CheckpointError, torch_to_keras


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype("float32"),
        "f16": rng.standard_normal((4, 1, 2)).astype("float16"),
        "f64": rng.standard_normal(7),
        "i64": rng.integers(-(2**40), 2**40, 5),
        "u8": rng.integers(0, 255, (2, 2)).astype("uint8"),
        "bool": rng.standard_normal(6) > 0,
        "scalar": np.array(2.5, dtype="float32"),
        "empty": np.zeros((0, 3), dtype="float32"),
    }


def test_read_matches_the_safetensors_library(tmp_path):
    arrays = _arrays()
    save_file(arrays, tmp_path / "a.safetensors", metadata={"format": "pt", "k": "v"})

    tensors, metadata = safetensors_io.read_safetensors(tmp_path / "a.safetensors")

    assert metadata == {"format": "pt", "k": "v"}
    assert tensors.keys() == arrays.keys()
    for name, array in arrays.items():
        assert tensors[name].shape == array.shape and tensors[name].dtype == array.dtype
        value = np.asarray(tensors[name])
        assert value.dtype == array.dtype and value.tobytes() == array.tobytes(), name
    np.testing.assert_array_equal(np.asarray(tensors["f16"][:, 0, 1:]), arrays["f16"][:, 0, 1:])
    assert tensors["f16"][:, 0][None].shape == (1, 4, 2)


def test_bfloat16_is_widened_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    value = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).bfloat16()
    save_torch({"w": value}, tmp_path / "b.safetensors")
    tensors, _ = safetensors_io.read_safetensors(tmp_path / "b.safetensors")
    assert tensors["w"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(tensors["w"]), value.float().numpy())


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_written_files_read_back_with_the_safetensors_library(tmp_path, dtype):
    arrays = _arrays()
    lazy = {
        k: safetensors_io.LazyTensor(lambda v=v: v, v.shape, v.dtype) for k, v in arrays.items()
    }
    safetensors_io.write_safetensors(tmp_path / "c.safetensors", lazy, dtype, metadata={"k": "v"})

    loaded = load_file(tmp_path / "c.safetensors")

    for name, array in arrays.items():
        want = array.astype(dtype) if dtype and array.dtype.kind == "f" else array
        assert loaded[name].dtype == want.dtype and loaded[name].tobytes() == want.tobytes()
    assert safetensors_io.read_safetensors(tmp_path / "c.safetensors")[1] == {
        "format": "pt",
        "k": "v",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no partial file left


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "d.safetensors"
    safetensors_io.write_safetensors(path, {"w": np.ones(3)})
    liar = safetensors_io.LazyTensor(lambda: np.ones(4), (3,), np.float64)  # announces 3, gives 4
    with pytest.raises(ValueError, match="announced"):
        safetensors_io.write_safetensors(path, {"w": liar})
    np.testing.assert_array_equal(load_file(path)["w"], np.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda data: data[:5], "only 5 bytes"),
        (lambda data: struct.pack("<Q", 10**9) + data[8:], "header claims"),
        (lambda data: data[:8] + b"{" * (len(data) - 8), "not valid JSON"),
        (lambda data: data[:-4], "ends at byte"),
    ],
)
def test_bad_files_fail_clearly(tmp_path, corrupt, reason):
    path = tmp_path / "e.safetensors"
    save_file({"w": np.ones((4, 4), dtype="float32")}, path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=reason) as info:
        safetensors_io.read_safetensors(path)
    assert "e.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_inconsistent_offsets_are_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(ValueError, match="inconsistent offsets"):
        safetensors_io.read_safetensors(path)


def test_to_keras_tensor_follows_torch_to_keras():
    from keras import layers

    rng = np.random.default_rng(1)
    conv, dense = layers.Conv2D(5, 3), layers.Dense(5)
    conv.build((None, 8, 8, 4))
    dense.build((None, 4))
    norm = layers.LayerNormalization()
    norm.build((None, 5))
    cases = [
        (rng.standard_normal((5, 4, 3, 3)), conv.kernel),
        (rng.standard_normal((5, 4)), dense.kernel),
        (rng.standard_normal((5, 4, 1, 1)), dense.kernel),  # 1x1 conv into a Dense layer
        (rng.standard_normal(5), norm.gamma),
    ]
    for value, variable in cases:
        got = keras.ops.convert_to_numpy(transpose.to_keras_tensor(value, variable))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, torch_to_keras(value, variable).astype("float32"))


def test_file_tensors_read_through_a_reused_buffer_stay_intact(tmp_path):
    """Transposed tensors from a file share one per-thread read buffer on TensorFlow: every
    converted value must be its own memory, whatever is read after it, and the same in
    float16 files, 1x1 convolutions and transposes that only move size-1 dimensions."""
    from keras import layers

    rng = np.random.default_rng(2)
    conv, dense, thin = layers.Conv2D(6, 3), layers.Dense(6), layers.Dense(1)
    conv.build((None, 8, 8, 4))
    dense.build((None, 4))
    thin.build((None, 4))
    cases = {
        "conv": (rng.standard_normal((6, 4, 3, 3)), conv.kernel),
        "conv_f16": (rng.standard_normal((6, 4, 3, 3)).astype("float16"), conv.kernel),
        "dense": (rng.standard_normal((6, 4)), dense.kernel),
        "dense_1x1": (rng.standard_normal((6, 4, 1, 1)), dense.kernel),
        "thin": (rng.standard_normal((1, 4)), thin.kernel),  # [1, 4] -> [4, 1]: a view
        "bias": (rng.standard_normal(6), dense.bias),
    }
    arrays = {
        k: v.astype(v.dtype if v.dtype == np.float16 else "float32") for k, (v, _) in cases.items()
    }
    safetensors_io.write_safetensors(tmp_path / "w.safetensors", arrays)
    tensors, _ = safetensors_io.read_safetensors(tmp_path / "w.safetensors")
    values = {k: transpose.to_keras_tensor(tensors[k], var) for k, (_, var) in cases.items()}
    for _ in range(2):  # more reads through the same buffer after the conversions
        for k, (_, var) in cases.items():
            transpose.to_keras_tensor(tensors[k], var)
    for k, (_, var) in cases.items():
        expected = torch_to_keras(arrays[k], var).astype("float32")
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(values[k]), expected, err_msg=k)


def test_deferred_models_cost_nothing_until_initialized():
    from keras.src.backend.common import global_state

    config = presets.resolve_model_config("tiny")
    models = deferred.build_models_deferred(config)
    pending = global_state.get_global_attribute("uninitialized_variables")
    assert len(pending) == sum(len(m.weights) for m in models.values())
    # export_lazy reads shapes only, so it works before any variable has a value.
    shapes = {k: t.shape for k, t in transpose.export_lazy(models["diffusion_model"]).items()}
    state = {k: np.full(shape, 0.5, "float32") for k, shape in shapes.items()}
    del state["conv_in.weight"]
    with pytest.raises(CheckpointError, match="missing keys: conv_in.weight"):
        transpose.match_torch_state(models["diffusion_model"], state, "test")
    deferred.forget_deferred(models.values())
    assert not global_state.get_global_attribute("uninitialized_variables")

    models = deferred.build_models_deferred(config)
    decoder = models["decoder"]
    shapes = {k: t.shape for k, t in transpose.export_lazy(decoder).items()}
    state = {k: np.full(shape, 0.5, "float32") for k, shape in shapes.items()}
    pairs = transpose.match_torch_state(decoder, state, "t")
    with pytest.raises(ValueError, match="would stay without values"):  # the other models
        deferred.initialize_deferred(models.values(), pairs)
    assert not global_state.get_global_attribute("uninitialized_variables")
    models = deferred.build_models_deferred(config)
    decoder = models.pop("decoder")
    deferred.forget_deferred(models.values())  # only the decoder gets values here
    deferred.initialize_deferred([decoder], transpose.match_torch_state(decoder, state, "t"))
    assert all(np.all(v.numpy() == 0.5) for v in decoder.weights)
    assert decoder(np.zeros((1, 2, 2, 4), "float32")).shape == (1, 4, 4, 3)


def test_paused_gc_restores_the_previous_state_even_after_an_error():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), deferred.paused_gc():
        assert not gc.isenabled()
        raise RuntimeError("a failed load")
    assert gc.isenabled()
    gc.disable()  # a user's own choice survives a load
    try:
        with deferred.paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
