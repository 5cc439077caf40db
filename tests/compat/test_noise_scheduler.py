"""The drop-in's training `NoiseScheduler` against KerasCV 0.9's, value for value.

KerasCV's `step` calls `ops.clip_by_value`, which Keras 3 does not have (it has
`ops.clip`): the test patches that name into KerasCV's ops module so KerasCV's own
`step` runs at all. Both schedulers draw their step noise from a `SeedGenerator(42)`,
so the same calls draw the same noise. KerasCV computes its tables in float32: at
t = 0 its 1 - alpha_prod_0 is beta_0 to a relative 1.7e-4 (keras-sd's table is
accumulated in float64), which bounds the agreement of `step`.
"""

import numpy as np
import pytest
from keras import ops

from keras_sd.compat import keras_cv

kcv_scheduler = pytest.importorskip("keras_cv.src.models.stable_diffusion.noise_scheduler")

SCHEDULES = [
    {},  # KerasCV's defaults: linear betas 1e-4 .. 0.02
    dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
]


@pytest.fixture
def clip_by_value(monkeypatch):
    def clip(x, clip_value_min, clip_value_max):
        return ops.clip(x, clip_value_min, clip_value_max)

    monkeypatch.setattr(kcv_scheduler.ops, "clip_by_value", clip, raising=False)


@pytest.mark.parametrize("kwargs", SCHEDULES)
def test_add_noise_matches_keras_cv(kwargs):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 8, 8, 4)).astype("float32")
    noise = rng.standard_normal((3, 8, 8, 4)).astype("float32")
    timesteps = np.array([0, 371, 999])
    theirs = kcv_scheduler.NoiseScheduler(**kwargs)
    ours = keras_cv.models.stable_diffusion.NoiseScheduler(**kwargs)
    assert ours.train_timesteps == theirs.train_timesteps == len(ours) == 1000
    expected = np.asarray(theirs.add_noise(latents, noise, timesteps))
    actual = np.asarray(ours.add_noise(latents, noise, timesteps))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(actual - latents).max() > 0.5  # the noise went in


@pytest.mark.parametrize("kwargs", SCHEDULES)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_step_matches_keras_cv(clip_by_value, kwargs, variance_type, clip_sample):
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 8, 8, 4)).astype("float32")
    model_output = rng.standard_normal((2, 8, 8, 4)).astype("float32")
    settings = dict(kwargs, variance_type=variance_type, clip_sample=clip_sample)
    theirs = kcv_scheduler.NoiseScheduler(**settings)
    ours = keras_cv.models.stable_diffusion.NoiseScheduler(**settings)
    for timestep in (500, 20, 0):  # with step noise, then the last step without
        expected = np.asarray(theirs.step(model_output, timestep, sample))
        actual = np.asarray(ours.step(model_output, timestep, sample))
        assert actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, rtol=5e-4, atol=1e-5)
        variance = float(np.asarray(theirs._get_variance(timestep)))
        assert ours.get_variance(timestep) == pytest.approx(variance, rel=1e-4, abs=1e-12)
