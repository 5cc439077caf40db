"""The drop-in's images against KerasCV's own `generate_image`, on the same weights.

`keras_cv_sd1` is KerasCV 0.9's pipeline on seeded random weights (conftest.py), and
`keras_cv_drop_in` the `keras_sd.compat.keras_cv` model converted from it. Both get the
same `diffusion_noise`; the drop-in samples with the "keras_cv" scheduler. KerasCV's
models differ slightly from the reference ones (tanh GELU in the UNet, VAE epsilon
1e-5), which moves the final latents by about 1e-4 of their range: within a grey level.
"""

import numpy as np
import pytest

from conftest import FULL_SIZE, KERAS_CV_SIZE

pytest.importorskip("keras_cv")
pytestmark = [pytest.mark.xdist_group(FULL_SIZE), pytest.mark.slow]

PROMPT = "a photograph of an astronaut riding a horse"
LATENT = KERAS_CV_SIZE // 8


def grey_levels(actual, expected) -> int:
    """The largest difference between two uint8 images, in grey levels."""
    assert actual.dtype == expected.dtype == np.uint8
    assert actual.shape == expected.shape
    return int(np.abs(actual.astype(int) - expected.astype(int)).max())


def assert_not_flat(images) -> None:
    """Random weights can saturate a decoded image; a flat one would compare equal to
    anything, so each image must have real content."""
    for image in images:
        print(
            f"image std {image.std():.1f}, unsaturated {np.mean((image > 0) & (image < 255)):.2f}"
        )
        assert image.std() > 10 and 0.05 < np.mean((image > 0) & (image < 255)), image.std()


def _noise(batch, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, LATENT, LATENT, 4)).astype("float32")


def test_generate_image_gives_keras_cv_image(keras_cv_sd1, keras_cv_drop_in):
    kcv, sd = keras_cv_sd1, keras_cv_drop_in
    encoded = kcv.encode_text(PROMPT)
    np.testing.assert_allclose(np.asarray(sd.encode_text(PROMPT)), encoded, atol=1e-4)
    noise = _noise(2)
    kwargs = dict(batch_size=2, num_steps=4, diffusion_noise=noise)

    expected = kcv.generate_image(encoded, **kwargs)
    actual = sd.generate_image(encoded, **kwargs)

    print(f"generate_image vs KerasCV: {grey_levels(actual, expected)} grey levels")
    assert_not_flat(expected)
    assert grey_levels(actual, expected) <= 1
    assert grey_levels(expected[0], expected[1]) > 20  # other noise: far from 1 level


def test_negative_prompt_and_one_noise_for_the_batch(keras_cv_sd1, keras_cv_drop_in):
    """A negative prompt and an unbatched [h, w, 4] noise (repeated over the batch);
    three steps, so the last steps' timestep order differs from the test above."""
    kcv, sd = keras_cv_sd1, keras_cv_drop_in
    encoded = kcv.encode_text(PROMPT)
    kwargs = dict(
        negative_prompt="blurry", batch_size=2, num_steps=3, diffusion_noise=_noise(1, 2)[0]
    )
    expected = kcv.generate_image(encoded, **kwargs)
    actual = sd.generate_image(encoded, **kwargs)
    print(f"negative prompt, one noise: {grey_levels(actual, expected)} grey levels")
    assert_not_flat(expected)
    np.testing.assert_array_equal(expected[0], expected[1])  # the same noise for both
    assert grey_levels(actual, expected) <= 1
