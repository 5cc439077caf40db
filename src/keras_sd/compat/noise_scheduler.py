"""KerasCV's training `NoiseScheduler` (DDPM, Ho et al. 2020) on keras-sd's schedule tables."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_sd.schedulers import DDIMScheduler
from keras_sd.schedulers.base import beta_table

VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)


class NoiseScheduler:
    """DDPM forward noising and ancestral step with KerasCV's interface.

    `add_noise` is keras-sd's (`Scheduler.add_noise`, DDPM eq. 4); `step` is the
    DDPM posterior of eqs. 6-7 with the variance chosen by `variance_type`.

    Args:
        train_timesteps: length of the training noise schedule.
        beta_start: beta at t = 0.
        beta_end: beta at the last training timestep.
        beta_schedule: "linear" or "scaled_linear".
        variance_type: one of "fixed_small", "fixed_small_log", "fixed_large",
            "fixed_large_log", "learned", "learned_range".
        clip_sample: clamp the predicted x_0 to [-1, 1] in `step`.

    Example:
    >>> scheduler = NoiseScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
    ...                            beta_end=0.012)
    >>> noisy = scheduler.add_noise(latents, noise, timesteps)  # doctest: +SKIP
    """

    def __init__(
        self,
        train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type must be one of {list(VARIANCE_TYPES)}; received {variance_type!r}."
            )
        self._schedule = DDIMScheduler(train_timesteps, beta_start, beta_end, beta_schedule)
        self.train_timesteps = train_timesteps
        self.variance_type = variance_type
        self.clip_sample = clip_sample
        table = self._schedule.alphas_cumprod  # the same alpha_prod table keras-sd samples with
        # The float32 betas the table was made from (as KerasCV keeps them): recovering them
        # from the float32 table would be off by its rounding, 1.7e-4 of beta_0.
        betas = beta_table(train_timesteps, beta_start, beta_end, beta_schedule).astype(np.float64)
        self.alphas_cumprod = ops.convert_to_tensor(table)
        self.betas = ops.convert_to_tensor(betas.astype(np.float32))
        self.alphas = ops.convert_to_tensor((1.0 - betas).astype(np.float32))
        self._table = table.astype(np.float64)
        self._betas = betas
        # Step noise comes from its own generator, seeded like KerasCV's (42).
        self.seed_generator = keras.random.SeedGenerator(seed=42)

    def __len__(self) -> int:
        return self.train_timesteps

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(alpha_prod_t) x_0 + sqrt(1 - alpha_prod_t) noise (DDPM eq. 4).

        Args:
            original_samples: clean samples [B, ...].
            noise: standard normal noise, same shape.
            timesteps: [B] integer timesteps.
        """
        return self._schedule.add_noise(original_samples, noise, timesteps)

    def get_variance(self, timestep: int, predicted_variance=None):
        """The posterior variance at `timestep` (its log for the "_log" types).

        fixed_small: beta-tilde_t = (1 - a_{t-1}) / (1 - a_t) beta_t (DDPM eq. 7),
        clipped to [1e-20, 1]; fixed_large: beta_t; learned: the model's value;
        learned_range: the model's `v` in [-1, 1] mixing the two, (v + 1) / 2 of beta_t.
        """
        t = int(timestep)
        prev = self._table[t - 1] if t > 0 else 1.0
        small = (1.0 - prev) / (1.0 - self._table[t]) * self._betas[t]
        kind = self.variance_type
        if kind == "fixed_small":
            return float(np.clip(small, 1e-20, 1.0))
        if kind == "fixed_small_log":
            return float(np.log(np.clip(small, 1e-20, 1.0)))
        if kind == "fixed_large":
            return float(self._betas[t])
        if kind == "fixed_large_log":
            return float(np.log(self._betas[t]))
        if kind == "learned":
            return predicted_variance
        frac = (predicted_variance + 1.0) / 2.0
        return frac * float(self._betas[t]) + (1.0 - frac) * float(small)

    _get_variance = get_variance  # KerasCV's name

    def step(self, model_output, timestep: int, sample, predict_epsilon: bool = True):
        """x_{t-1} sampled from the DDPM posterior given the model output at `timestep`.

        Args:
            model_output: predicted noise (or x_0 when `predict_epsilon` is False); for
                the "learned" types it may carry the variance as extra trailing channels.
            timestep: the current integer timestep.
            sample: x_t.
            predict_epsilon: whether `model_output` is noise.
        """
        t = int(timestep)
        predicted_variance = None
        channels = sample.shape[-1]
        learned = self.variance_type in ("learned", "learned_range")
        if learned and model_output.shape[-1] == 2 * channels:
            model_output, predicted_variance = ops.split(model_output, 2, axis=-1)
        # Python floats: numpy float64 scalars would make float32 tensors float64.
        a_t = float(self._table[t])
        a_prev = float(self._table[t - 1]) if t > 0 else 1.0
        beta = float(self._betas[t])
        if predict_epsilon:  # DDPM eq. 15
            x0 = (sample - math.sqrt(1.0 - a_t) * model_output) / math.sqrt(a_t)
        else:
            x0 = model_output
        if self.clip_sample:
            x0 = ops.clip(x0, -1.0, 1.0)
        # DDPM eq. 7: the posterior mean's coefficients on x_0 and x_t.
        x0_coeff = math.sqrt(a_prev) * beta / (1.0 - a_t)
        xt_coeff = math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)
        prev = x0_coeff * x0 + xt_coeff * sample
        if t > 0:
            noise = keras.random.normal(ops.shape(model_output), seed=self.seed_generator)
            variance = self.get_variance(t, predicted_variance)
            if self.variance_type.endswith("_log"):
                std = math.exp(0.5 * variance)
            else:
                std = ops.sqrt(variance) if learned else math.sqrt(variance)
            prev = prev + std * noise
        return prev
