"""Loaded models keep their weights in the dtype they compute in
(`keras_sd.weights.precision`): float16/bfloat16 variables after a load under a mixed
policy or with `dtype="float16"`/`"bfloat16"`, float32 variables with `dtype="mixed_*"`,
trainers train float32 variables only, and bfloat16 weights save as BF16 and load back exactly.
"""

import contextlib
import json
import struct

import keras
import numpy as np
import pytest

from keras_sd import StableDiffusion
from keras_sd.training import (
    DiffusionTrainer,
    TextualInversionTrainer,
    VAETrainer,
    textual_inversion_dataset,
)
from keras_sd.weights.state_dict import named_variables

PROMPT = "a red circle on a blue background"
COMPONENTS = ("text_encoder", "diffusion_model", "decoder", "image_encoder")
# (mean, max) absolute grey-level difference from the float32 image: the figures of
# test_pipeline's mixed-precision closeness test (11 mantissa bits for float16, 8 for
# bfloat16, over 10 guided steps).
TOLERANCE = {"float16": (1.0, 8), "bfloat16": (3.0, 32)}
# (global policy, dtype=, the models' compute dtype)
INFERENCE_LOADS = [
    ("mixed_bfloat16", None, "bfloat16"),
    ("mixed_float16", None, "float16"),
    ("float32", "float16", "float16"),
    ("float32", "bfloat16", "bfloat16"),
]


@contextlib.contextmanager
def global_policy(name: str):
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def variable_dtypes(sd) -> dict:
    return {c: sorted({v.dtype for v in getattr(sd, c).weights}) for c in COMPONENTS}


def image(sd) -> np.ndarray:
    return sd.text_to_image(PROMPT, num_steps=10, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """tiny-shapes as a diffusers folder (the converting loader), and its float32 image."""
    sd = StableDiffusion.from_preset("tiny-shapes", jit_compile=False)
    path = tmp_path_factory.mktemp("inference_dtype") / "tiny-shapes"
    sd.save_checkpoint(path, layout="diffusers")
    return path, image(sd)


def load(source: str, folder, **kwargs):
    if source == "preset":
        return StableDiffusion.from_preset("tiny-shapes", jit_compile=False, **kwargs)
    return StableDiffusion.from_checkpoint(folder, jit_compile=False, **kwargs)


@pytest.mark.parametrize("source", ["preset", "checkpoint"])
@pytest.mark.parametrize(("policy", "dtype", "compute"), INFERENCE_LOADS)
def test_inference_load_keeps_weights_in_the_compute_dtype(
    tiny_folder, source, policy, dtype, compute
):
    folder, reference = tiny_folder
    with global_policy(policy):
        sd = load(source, folder, dtype=dtype)
        ours = image(sd)
    # The one deliberate exception: VAEs with force_upcast run (and keep weights) in
    # float32 under float16 compute, their activations outgrow float16's range.
    vae = "float32" if compute == "float16" else compute
    expected = {"text_encoder": [compute], "diffusion_model": [compute]}
    assert variable_dtypes(sd) == {**expected, "decoder": [vae], "image_encoder": [vae]}
    assert sd.diffusion_model.dtype_policy.name == compute
    diff = np.abs(ours.astype(np.int32) - reference.astype(np.int32))
    mean_tol, max_tol = TOLERANCE[compute]
    assert diff.mean() <= mean_tol and diff.max() <= max_tol, (diff.mean(), diff.max())


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_mixed_dtype_keeps_float32_variables_with_low_precision_compute(policy):
    with global_policy(policy):
        sd = load("preset", None, dtype="mixed_bfloat16")
    assert variable_dtypes(sd) == {c: ["float32"] for c in COMPONENTS}
    assert {getattr(sd, c).compute_dtype for c in COMPONENTS} == {"bfloat16"}


def test_float32_policy_loads_float32_as_before(tiny_folder):
    sd = load("checkpoint", tiny_folder[0])
    assert variable_dtypes(sd) == {c: ["float32"] for c in COMPONENTS}
    assert sd.diffusion_model.dtype_policy.name == "float32"


def random_images(n=3, size=32):
    return list((np.random.default_rng(0).random((n, size, size, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize(("policy", "dtype"), [("mixed_bfloat16", None), ("float32", "float16")])
def test_textual_inversion_trains_float32_rows_of_a_low_precision_load(policy, dtype):
    with global_policy(policy):
        sd = load("preset", None, dtype=dtype)
        low = sd.diffusion_model.dtype
        unet_before = [np.array(keras.ops.convert_to_numpy(w)) for w in sd.diffusion_model.weights]
        trainer = TextualInversionTrainer(sd, "<s1>", initializer_token="circle", seed=0)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
        rows = trainer.text_encoder.rows
        start = np.array(keras.ops.convert_to_numpy(rows))
        data = textual_inversion_dataset(
            random_images(), "<s1>", sd.tokenizer, size=32, repeats=1, batch_size=3
        )
        trainer.fit(data, epochs=1, verbose=0)
    assert low in ("bfloat16", "float16")
    assert rows.dtype == "float32" and [v.path for v in trainer.trainable_variables] == [rows.path]
    learned = np.array(keras.ops.convert_to_numpy(rows))
    assert np.isfinite(learned).all() and np.abs(learned - start).max() > 1e-4
    # float16 compute gets loss scaling even under a float32 global policy.
    scaled = type(trainer.optimizer).__name__ == "LossScaleOptimizer"
    assert scaled == (low == "float16")
    unet_after = [keras.ops.convert_to_numpy(w) for w in sd.diffusion_model.weights]
    assert all((a == b).all() for a, b in zip(unet_before, unet_after, strict=True))
    assert sd.text_encoder.token_embedding.embeddings.dtype == low  # rows written back


def diffusion_trainer(sd):
    return DiffusionTrainer(
        sd.text_encoder, sd.diffusion_model, sd.image_encoder, sd.scheduler,
        condition_dropout=0.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "make", [diffusion_trainer, lambda sd: VAETrainer(sd.image_encoder, sd.decoder)]
)
def test_trainers_refuse_low_precision_variables(make):
    with global_policy("mixed_bfloat16"):
        trainer = make(load("preset", None))
        with pytest.raises(ValueError, match='dtype="mixed_bfloat16"'):
            trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        masters = make(load("preset", None, dtype="mixed_bfloat16"))
        masters.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert {v.dtype for v in masters.trainable_variables} == {"float32"}


@pytest.mark.parametrize(
    "dtype", ["float64", "int8", "mixed_float32", keras.DTypePolicy("bfloat16")]
)
def test_bad_dtype_names_the_argument(tiny_folder, dtype):
    for call in (
        lambda: StableDiffusion.from_preset("tiny-shapes", dtype=dtype),
        lambda: StableDiffusion.from_checkpoint(tiny_folder[0], dtype=dtype),
        lambda: StableDiffusion.from_keras_cv(None, dtype=dtype),
    ):
        with pytest.raises(ValueError, match=r"dtype must be one of .*'mixed_bfloat16'"):
            call()


def stored_dtypes(path) -> set:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


@pytest.mark.parametrize(("layout", "name"), [("keras", "tiny.safetensors"), ("diffusers", "tiny")])
def test_bfloat16_weights_save_as_bf16_and_load_back_exactly(tmp_path, layout, name):
    with global_policy("mixed_bfloat16"):
        sd = load("preset", None)
    sd.save_checkpoint(tmp_path / name, layout=layout)
    file = (
        tmp_path / name
        if layout == "keras"
        else tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"
    )
    assert stored_dtypes(file) == {"BF16"}
    back = StableDiffusion.from_checkpoint(tmp_path / name, dtype="bfloat16", jit_compile=False)
    for component in COMPONENTS:
        ours = named_variables(getattr(sd, component))
        theirs = named_variables(getattr(back, component))
        assert sorted(ours) == sorted(theirs)
        for key, variable in ours.items():
            assert theirs[key].dtype == "bfloat16"
            same = keras.ops.convert_to_numpy(variable) == keras.ops.convert_to_numpy(theirs[key])
            assert same.all(), key


def test_an_upcast_vae_gets_the_files_float32_values_exactly(tmp_path):
    """Under float16 the VAE keeps float32 weights: they come from the file, not from
    a float16 conversion made ahead of the build."""
    sd = StableDiffusion(64, 64, config="tiny", jit_compile=False)  # float32 random values
    sd.save_checkpoint(tmp_path / "tiny", layout="diffusers")
    with global_policy("mixed_float16"):
        half = StableDiffusion.from_checkpoint(tmp_path / "tiny", jit_compile=False)
    for component in ("decoder", "image_encoder"):
        ours = named_variables(getattr(sd, component))
        theirs = named_variables(getattr(half, component))
        for key, variable in ours.items():
            assert theirs[key].dtype == "float32"
            same = keras.ops.convert_to_numpy(variable) == keras.ops.convert_to_numpy(theirs[key])
            assert same.all(), key
