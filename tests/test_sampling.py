"""The compiled denoising loop: one trace per shape, seeds, stochastic steps."""

import numpy as np
import pytest

from keras_sd import DDIMScheduler, StableDiffusion


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion(32, 32, config="tiny")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_new_prompt_seed_or_guidance_does_not_retrace(jit_compile):
    sd = StableDiffusion(32, 32, config="tiny", jit_compile=jit_compile)
    first = sd.text_to_image("a red circle", num_steps=3, seed=1, progress=False)
    assert sd.sampler.trace_count == 1
    second = sd.text_to_image(
        "a blue square",
        negative_prompt="a green star",
        num_steps=3,
        seed=2,
        unconditional_guidance_scale=5.0,
        progress=False,
    )
    assert sd.sampler.trace_count == 1
    assert not np.array_equal(first, second)
    sd.text_to_image("a red circle", num_steps=4, seed=1, progress=False)  # new step count
    assert sd.sampler.trace_count == 2


def test_same_seed_same_image_and_other_seed_differs(sd):
    a = sd.text_to_image("a red circle", num_steps=2, seed=5, progress=False)
    b = sd.text_to_image("a red circle", num_steps=2, seed=5, progress=False)
    c = sd.text_to_image("a red circle", num_steps=2, seed=6, progress=False)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_progress_callback_reports_every_step(sd):
    seen = []
    latents = np.zeros((1, 16, 16, 4), np.float32)
    context = sd.encode_text("a red circle")
    sd.sampler(
        DDIMScheduler(), latents, context, guidance_scale=1.0, num_steps=4, callback=seen.append
    )
    assert sorted(seen) == [0, 1, 2, 3]


def test_eta_uses_step_noise_deterministically(sd):
    scheduler = DDIMScheduler(eta=1.0)
    a = sd.text_to_image("a red circle", num_steps=3, seed=3, scheduler=scheduler, progress=False)
    b = sd.text_to_image("a red circle", num_steps=3, seed=3, scheduler=scheduler, progress=False)
    deterministic = sd.text_to_image("a red circle", num_steps=3, seed=3, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, deterministic)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"width": 31}, "width must be a positive multiple of 2"),
        ({"unconditional_guidance_scale": "high"}, "unconditional_guidance_scale"),
        (
            {"seed": 1, "diffusion_noise": np.zeros((1, 16, 16, 4))},
            "either diffusion_noise or seed",
        ),
        ({"diffusion_noise": np.zeros((1, 8, 8, 4))}, "diffusion_noise must have shape"),
    ],
)
def test_bad_arguments_name_the_argument(sd, kwargs, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        sd.text_to_image("a red circle", progress=False, **kwargs)


def test_prompt_type_error(sd):
    with pytest.raises(TypeError, match="prompt must be a string"):
        sd.text_to_image(["a", "b"])
