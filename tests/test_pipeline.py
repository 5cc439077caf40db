"""StableDiffusion end to end against diffusers' StableDiffusionPipeline.

Same tiny random weights (tests/tiny_components.py, shared through the
diffusers-format reader), same starting latents, DDIM, guidance 7.5, 10 steps: the
uint8 images must agree to within a mean abs difference of 1.0 and a max of 8 grey
levels. The diffusers pipeline, its images per configuration and the uncompiled
keras-sd pipeline are built once a session; each test builds only the keras-sd
pipeline its check is about (XLA, a convolution algorithm, a precision policy).

Run as a script (`python tests/test_pipeline.py`) it prints the comparison as
JSON; tests/test_backends.py uses that to repeat the check on other backends.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tiny_components import (  # noqa: E402
    NEGATIVE,
    PROMPT,
    STEPS,
    build_ours,
    build_reference,
    initial_latents,
    reference_images,
)

MEAN_TOLERANCE = 1.0  # uint8 grey levels
MAX_TOLERANCE = 8


def compare(ours, reference) -> dict:
    diff = np.abs(ours.astype(np.int32) - reference.astype(np.int32))
    return {
        "mean_abs": float(diff.mean()),
        "max_abs": int(diff.max()),
        "reference_std": float(reference.std()),
        "reference_clipped": float(np.mean((reference == 0) | (reference == 255))),
    }


def our_images(sd, negative_prompt=None, guidance=7.5):
    latents = initial_latents()
    return sd.text_to_image(
        PROMPT,
        negative_prompt=negative_prompt,
        batch_size=latents.shape[0],
        num_steps=STEPS,
        unconditional_guidance_scale=guidance,
        diffusion_noise=latents,
        progress=False,
    )


def checked_comparison(ours, reference) -> dict:
    assert ours.dtype == np.uint8 and ours.shape == reference.shape
    return compare(ours, reference)


def build_ours_from_loaded_values(pipe, **sd_kwargs):
    """`build_ours(pipe, **sd_kwargs)` with each variable created from the value the
    loader assigns it: the initializers (on JAX a random program per weight shape),
    whose values the loader would overwrite, never run."""
    import keras

    from keras_sd.weights import deferred

    with keras.StatelessScope(initialize_variables=False) as scope:
        sd = build_ours(pipe, **sd_kwargs)  # the loader's assignments are kept in `scope`
    models = [getattr(sd, attr) for attr in deferred.MODELS]
    pairs = [(v, lambda v=v: scope.get_current_value(v)) for m in models for v in m.weights]
    deferred.initialize_deferred(models, pairs)
    return sd


def run_comparison(tmp_path, negative_prompt=None, guidance=7.5, **sd_kwargs) -> dict:
    """Builds both pipelines and compares them (the script mode's whole check)."""
    pipe = build_reference(tmp_path)
    reference = reference_images(pipe, initial_latents(), negative_prompt, guidance)
    ours = our_images(build_ours_from_loaded_values(pipe, **sd_kwargs), negative_prompt, guidance)
    return checked_comparison(ours, reference)


def assert_close(result: dict) -> None:
    # The reference images must be informative, or agreement would prove nothing.
    assert result["reference_std"] > 20 and result["reference_clipped"] < 0.5, result
    assert result["mean_abs"] <= MEAN_TOLERANCE, result
    assert result["max_abs"] <= MAX_TOLERANCE, result


@pytest.mark.parametrize("negative_prompt, guidance", [(None, 7.5), (NEGATIVE, 7.5), (None, 1.0)])
def test_text_to_image_matches_diffusers(
    tiny_keras_sd, tiny_reference_images, negative_prompt, guidance
):
    """With and without a negative prompt, and without guidance (guidance 1)."""
    ours = our_images(tiny_keras_sd, negative_prompt, guidance)
    assert_close(checked_comparison(ours, tiny_reference_images(negative_prompt, guidance)))


def test_jit_compile_matches_diffusers(tiny_diffusers_pipe, tiny_reference_images):
    sd = build_ours(tiny_diffusers_pipe, jit_compile=True)
    assert_close(checked_comparison(our_images(sd), tiny_reference_images()))


@pytest.mark.parametrize("algorithm, jit_compile", [("winograd", True), ("gemm", False)])
def test_convolution_algorithms_match_diffusers(
    tiny_diffusers_pipe, tiny_reference_images, algorithm, jit_compile, winograd_calls, gemm_calls
):
    """Every 3x3 convolution of the UNet and VAE by Winograd (under XLA) or by one
    GEMM over the patches (outside XLA where the backend has a graph mode), chosen
    explicitly: the tiny model is below the "auto" thresholds."""
    from keras_sd.models.conv import set_conv_algorithm

    previous = set_conv_algorithm(algorithm)
    try:
        sd = build_ours(tiny_diffusers_pipe, jit_compile=jit_compile)
        assert_close(checked_comparison(our_images(sd), tiny_reference_images()))
    finally:
        set_conv_algorithm(previous)
    calls = winograd_calls if algorithm == "winograd" else gemm_calls
    assert len(calls) > 10 and not (winograd_calls if algorithm == "gemm" else gemm_calls)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(run_comparison(folder)))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "bfloat16"])
def test_mixed_precision_stays_close_to_float32(tiny_diffusers_pipe, tiny_reference_images, policy):
    import keras

    keras.mixed_precision.set_global_policy(policy)
    try:
        sd = build_ours(tiny_diffusers_pipe, jit_compile=False)
        assert sd.diffusion_model.compute_dtype == policy.split("_")[-1]
        ours = our_images(sd)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    result = compare(ours, tiny_reference_images())
    # Half precision keeps 11 (float16) or 8 (bfloat16) mantissa bits; over 10
    # guided steps that moves pixels by a few grey levels, never by a wrong-model amount.
    tolerance = {"mixed_float16": (1.0, 8), "mixed_bfloat16": (3.0, 32), "bfloat16": (3.0, 32)}
    tolerance = tolerance[policy]
    assert result["mean_abs"] <= tolerance[0] and result["max_abs"] <= tolerance[1], result
