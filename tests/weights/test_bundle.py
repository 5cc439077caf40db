"""Bundles, the single-file format of earlier keras-sd versions: still read exactly,
with clear errors for bad files. The test writes them as those versions did."""

import keras
import numpy as np
import pytest
from safetensors.numpy import save_file

from keras_sd.pipeline import StableDiffusion
from keras_sd.presets import resolve_model_config
from keras_sd.weights import bundle
from keras_sd.weights.bundle import bundle_kwargs
from keras_sd.weights.diffusers import export_components
from keras_sd.weights.native import pipeline_metadata

load_bundle = StableDiffusion.from_checkpoint


def save_bundle(sd, path, dtype="float16"):
    """A bundle as earlier keras-sd versions wrote it: diffusers-layout state dicts under
    component prefixes, pipeline metadata tagged "keras_sd.bundle"."""
    tensors = {
        f"{component}.{key}": np.ascontiguousarray(value, dtype=dtype)
        for component, state in export_components(sd).items()
        for key, value in state.items()
    }
    save_file(tensors, str(path), metadata=pipeline_metadata(sd, bundle.FORMAT, bundle.VERSION))


def random_float16_weights(model, rng):
    # Random everywhere (so every weight matters), already float16-rounded so the
    # float16 bundle stores them exactly.
    for var in model.weights:
        value = rng.normal(0.0, 0.05, var.shape).astype(np.float16).astype(np.float32)
        var.assign(value)


@pytest.fixture(scope="module")
def tiny_sd():
    keras.utils.set_random_seed(0)
    config = resolve_model_config("tiny")
    config["text_encoder"]["vocab_size"] += 1  # room for the added token below
    sd = StableDiffusion(32, 32, jit_compile=False, config=config)
    sd.tokenizer.add_tokens(["<shape-x>"])
    rng = np.random.default_rng(0)
    for model in (sd.text_encoder, sd.diffusion_model, sd.decoder, sd.image_encoder):
        random_float16_weights(model, rng)
    return sd


def test_round_trip_gives_identical_outputs(tiny_sd, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_bundle(tiny_sd, path)
    loaded = load_bundle(path, jit_compile=False)
    assert (loaded.img_width, loaded.img_height) == (32, 32)
    assert loaded.tokenizer.added_tokens == ["<shape-x>"]
    for name in ("text_encoder", "diffusion_model", "decoder", "image_encoder"):
        for a, b in zip(getattr(tiny_sd, name).weights, getattr(loaded, name).weights, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompt = "a red <shape-x> on a blue background"
    kwargs = dict(num_steps=2, seed=3, progress=False)
    expected = tiny_sd.text_to_image(prompt, **kwargs)
    np.testing.assert_array_equal(loaded.text_to_image(prompt, **kwargs), expected)


def test_float32_bundle_is_exact_and_larger(tiny_sd, tmp_path):
    half, full = tmp_path / "half.safetensors", tmp_path / "full.safetensors"
    save_bundle(tiny_sd, half)
    save_bundle(tiny_sd, full, dtype="float32")
    assert full.stat().st_size > 1.9 * half.stat().st_size
    loaded = load_bundle(full, jit_compile=False)
    for a, b in zip(tiny_sd.diffusion_model.weights, loaded.diffusion_model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(("dtype", "expected"), [(None, "bfloat16"), ("mixed_bfloat16", "float32")])
def test_bundle_follows_the_inference_dtype_rule(tiny_sd, tmp_path, dtype, expected):
    path = tmp_path / "tiny.safetensors"
    save_bundle(tiny_sd, path)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        loaded = load_bundle(path, jit_compile=False, dtype=dtype)
    finally:
        keras.config.set_dtype_policy("float32")
    for name in ("text_encoder", "diffusion_model", "decoder", "image_encoder"):
        assert {w.dtype for w in getattr(loaded, name).weights} == {expected}, name


def test_truncated_file_names_the_file(tiny_sd, tmp_path):
    path = tmp_path / "broken.safetensors"
    save_bundle(tiny_sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_bundle(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_bundle(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_bundle(tmp_path / "missing.safetensors")


def test_plain_safetensors_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"unet.x": np.zeros(2, np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a keras-sd bundle"):
        bundle_kwargs(path)
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        load_bundle(path)
