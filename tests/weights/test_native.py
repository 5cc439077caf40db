"""keras-layout checkpoints: saved as the variables are, loaded by mapping the file.

The weights' ground truth is the CompVis loader, which tests/weights/test_checkpoint.py
checks against diffusers' own readers: a file converted to the keras layout must load
into the very same weights. On TensorFlow/CPU the variables must live in the file's
memory map itself (DLPack gives their buffer addresses), and writing them must leave
the file alone.
"""

import ctypes
import gc
import hashlib
import json
import os
import struct

import keras
import numpy as np
import pytest

from conftest import tensorflow_buffer_address
from keras_sd import StableDiffusion
from keras_sd.backend import has_accelerator
from keras_sd.conversion import convert
from keras_sd.models import clip_text, unet, vae
from keras_sd.weights import deferred, native, safetensors_io
from keras_sd.weights.checkpoint import save_checkpoint
from keras_sd.weights.state_dict import CheckpointError, named_variables

COMPONENTS = ("text_encoder", "diffusion_model", "decoder", "image_encoder")
# Where variables take the mapped memory itself (on GPUs they live in device memory).
ON_TENSORFLOW_CPU = keras.backend.backend() == "tensorflow" and not has_accelerator()
SD2_TINY = {
    "tokenizer": {"pad_token": "!"},
    "text_encoder": {**clip_text.TINY_CONFIG, "activation": "gelu"},
    "unet": {**unet.TINY_CONFIG, "num_heads": (2, 4), "use_linear_projection": True},
    "vae": vae.TINY_CONFIG,
    "scheduler": {"prediction_type": "v_prediction"},
}


def _random_sd(config, seed=0) -> StableDiffusion:
    """A tiny model with every weight random (no all-zero or all-one tensors)."""
    sd = StableDiffusion(img_width=48, img_height=32, jit_compile=False, config=config)
    rng = np.random.default_rng(seed)
    for component in COMPONENTS:
        for variable in getattr(sd, component).weights:
            variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    return sd


def _variables(sd) -> dict:
    return {
        f"{component}/{name}": variable
        for component in COMPONENTS
        for name, variable in named_variables(getattr(sd, component)).items()
    }


def _assert_same_weights(a, b):
    left, right = _variables(a), _variables(b)
    assert left.keys() == right.keys()
    for key, variable in left.items():
        assert np.array_equal(variable.numpy(), right[key].numpy()), key


def _file_ranges(path) -> list:
    """Address ranges of this process's memory maps of `path`."""
    ranges, target = [], os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and os.path.realpath(fields[5]) == target:
                begin, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((begin, end))
    return ranges


def _mapped_keys(sd, path) -> set:
    ranges = _file_ranges(path)
    return {
        key
        for key, variable in _variables(sd).items()
        if any(begin <= tensorflow_buffer_address(variable) < end for begin, end in ranges)
    }


def _aligned_keys(path) -> set:
    tensors, _ = safetensors_io.read_safetensors(path)
    return {k for k, t in tensors.items() if t.file_offset % native.ALIGNMENT == 0}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    sd = _random_sd("tiny")
    sd.tokenizer.add_tokens(["<cat-toy>"])  # textual inversion placeholders are kept
    path = tmp_path_factory.mktemp("native") / "tiny-keras.safetensors"
    save_checkpoint(sd, path, layout="keras")
    return sd, path


@pytest.mark.parametrize("config", ["tiny", SD2_TINY], ids=["sd1", "sd2"])
def test_compvis_file_converted_to_keras_layout_loads_the_same_weights(tmp_path, config):
    compvis = tmp_path / "model.safetensors"
    save_checkpoint(_random_sd(config), compvis)
    reference = StableDiffusion.from_checkpoint(compvis, config=config, img_size=64)
    keras_file = tmp_path / "model-keras.safetensors"
    convert(compvis, keras_file, layout="keras", config=config, img_size=64)

    sd = StableDiffusion.from_checkpoint(keras_file)

    _assert_same_weights(sd, reference)
    assert sd.config == json.loads(json.dumps(reference.config))  # tuples become lists
    assert (sd.img_width, sd.img_height) == (64, 64)
    expected = "v_prediction" if config is SD2_TINY else "epsilon"
    assert sd.scheduler.prediction_type == expected
    assert sd.tokenizer.pad_token == reference.tokenizer.pad_token
    ids = reference.tokenizer(["a red circle"])
    context = keras.ops.convert_to_numpy(sd.text_encoder(ids))
    np.testing.assert_array_equal(context, keras.ops.convert_to_numpy(reference.text_encoder(ids)))


@pytest.mark.parametrize("layout", ["compvis", "keras"])
def test_loads_run_with_the_garbage_collector_paused(tmp_path, tiny_file, monkeypatch, layout):
    # Full collections during a full-size load cost 0.24 s each, holding the GIL.
    path = tiny_file[1]
    if layout == "compvis":
        path = tmp_path / "model.safetensors"
        save_checkpoint(tiny_file[0], path)
    seen, build = [], deferred.build_models_deferred
    monkeypatch.setattr(
        deferred,
        "build_models_deferred",
        lambda config, *source: seen.append(gc.isenabled()) or build(config, *source),
    )
    _assert_same_weights(StableDiffusion.from_checkpoint(path), tiny_file[0])
    assert seen == [False] and gc.isenabled()
    with pytest.raises(FileNotFoundError):  # a failed load gives the collector back too
        StableDiffusion.from_checkpoint(tmp_path / "missing.safetensors")
    assert gc.isenabled()


def test_variables_are_the_files_memory_on_tensorflow_cpu(tiny_file):
    if not ON_TENSORFLOW_CPU:
        pytest.skip("buffer addresses are read through TensorFlow; values are checked above")
    sd, path = tiny_file
    loaded = StableDiffusion.from_checkpoint(path)
    _assert_same_weights(loaded, sd)
    assert loaded.tokenizer.added_tokens == ["<cat-toy>"]
    assert (loaded.img_width, loaded.img_height) == (48, 32)
    aligned = _aligned_keys(path)
    assert len(aligned) > 0.95 * len(_variables(sd))  # all but a few tiny biases
    assert _mapped_keys(loaded, path) == aligned


def test_writing_a_mapped_variable_leaves_the_file_unchanged(tiny_file):
    sd, path = tiny_file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = StableDiffusion.from_checkpoint(path)
    kernel = loaded.diffusion_model.weights[0]
    original = kernel.numpy()
    kernel.assign(original + 1.0)
    kernel.assign_add(np.ones(kernel.shape, "float32"))

    np.testing.assert_array_equal(kernel.numpy(), (original + 1.0) + 1.0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    if ON_TENSORFLOW_CPU:
        # TensorFlow copied before those writes; a write straight into a mapped
        # variable's memory must reach the variable but not the file (copy-on-write).
        variable = loaded.diffusion_model.weights[1]
        address = tensorflow_buffer_address(variable)
        assert any(begin <= address < end for begin, end in _file_ranges(path))
        before = variable.numpy().reshape(-1)[0]
        ctypes.memmove(address, np.float32(before + 1.0).tobytes(), 4)
        assert variable.numpy().reshape(-1)[0] == np.float32(before + 1.0)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    _assert_same_weights(
        StableDiffusion.from_checkpoint(path), sd
    )  # a new load sees the file's values


def test_other_dtypes_and_backends_copy(tmp_path, tiny_file, monkeypatch):
    sd, path = tiny_file
    half = tmp_path / "half.safetensors"
    save_checkpoint(sd, half, layout="keras", dtype="float16")
    loaded = StableDiffusion.from_checkpoint(half)
    for key, variable in _variables(sd).items():
        want = variable.numpy().astype("float16").astype("float32")
        assert np.array_equal(_variables(loaded)[key].numpy(), want), key
    if ON_TENSORFLOW_CPU:
        assert not _mapped_keys(loaded, half)  # float16 values cannot be float32 variables

    # Where tensors cannot share memory (JAX, PyTorch, GPUs) the values are read instead.
    monkeypatch.setattr(native.backend, "borrow_numpy", lambda array: None)
    copied = StableDiffusion.from_checkpoint(path)
    _assert_same_weights(copied, sd)
    if ON_TENSORFLOW_CPU:
        assert not _mapped_keys(copied, path)


def test_file_is_aligned_safetensors_with_config(tiny_file):
    from safetensors.numpy import load_file

    sd, path = tiny_file
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    metadata = header.pop("__metadata__")
    assert (8 + length) % native.ALIGNMENT == 0
    # Aligned sizes come first, so each of them starts on a 64-byte boundary.
    spans = sorted(entry["data_offsets"] for entry in header.values())
    sizes = [end - begin for begin, end in spans]
    odd = [i for i, n in enumerate(sizes) if n % native.ALIGNMENT]
    assert 0 < len(odd) < 0.05 * len(sizes) and odd == list(range(odd[0], len(sizes)))
    assert all(begin % native.ALIGNMENT == 0 for begin, _ in spans[: odd[0]])

    values = load_file(path)  # the safetensors library reads it: a valid file
    for key, variable in _variables(sd).items():
        np.testing.assert_array_equal(values[key], variable.numpy(), err_msg=key)
    assert metadata["format"] == native.FORMAT
    config = json.loads(metadata["config"])
    assert config["unet"] == json.loads(json.dumps(sd.config["unet"]))
    assert (metadata["img_width"], metadata["img_height"]) == ("48", "32")


def test_alignment_argument_is_validated(tmp_path):
    with pytest.raises(ValueError, match="alignment must be a power of two >= 8; received 48"):
        safetensors_io.write_safetensors(
            tmp_path / "x.safetensors", {"w": np.ones(3)}, alignment=48
        )


def test_bad_keras_layout_files_give_clear_errors(tmp_path, tiny_file):
    from test_checkpoint import _assert_clean_error

    sd, path = tiny_file
    tensors, metadata = safetensors_io.read_safetensors(path)
    config = json.loads(metadata["config"])
    config["unet"] = {**config["unet"], "transformer_layers_per_block": 2}
    other = tmp_path / "other.safetensors"
    safetensors_io.write_safetensors(
        other, tensors, metadata={**metadata, "config": json.dumps(config)}, alignment=64
    )
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(other)
    _assert_clean_error(info, "other.safetensors", "missing keys", "transformer_blocks.1")

    with pytest.raises(ValueError) as info:
        StableDiffusion.from_checkpoint(path, config="sd1")
    _assert_clean_error(info, "keras-layout checkpoint", "config=")

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError) as info:
        StableDiffusion.from_checkpoint(truncated)
    _assert_clean_error(info, "cut.safetensors", "truncated")

    with pytest.raises(ValueError, match="written as .safetensors"):
        save_checkpoint(sd, tmp_path / "model.bin", layout="keras")
    assert not native.is_keras_layout(tmp_path / "missing.safetensors")
