"""DDIM sampler (Song, Meng & Ermon 2020, "Denoising Diffusion Implicit Models").

Reference: https://arxiv.org/abs/2010.02502
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
from keras import ops

from keras_sd.schedulers.base import (
    Scheduler,
    img2img_start,
    spaced_timesteps,
    take_step_constant,
)

# What diffusers' DDIMScheduler assumes for keys missing from a config file.
# They differ from Stable Diffusion's settings (our constructor defaults), and
# older SD configs omit some keys, so a missing key must mean diffusers' value.
DIFFUSERS_DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": True,
    "clip_sample_range": 1.0,
}


def config_from_diffusers(cfg: dict) -> dict:
    """DDIMScheduler config equivalent to diffusers' `DDIMScheduler.from_config(cfg)`.

    Args:
        cfg: a parsed diffusers scheduler_config.json, of any scheduler class
            (Stable Diffusion 1.x ships a PNDM config that pipelines reuse for DDIM).

    Returns:
        kwargs for `DDIMScheduler`; `eta` is left at its default since diffusers
        passes it per call, not in the config.

    Raises:
        ValueError: if the config enables a feature keras-sd does not implement
            (trained_betas, thresholding, rescale_betas_zero_snr).

    Example:
    >>> cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    ...        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    >>> DDIMScheduler(**config_from_diffusers(cfg)).schedule(2)["timesteps"].tolist()
    [501, 1]
    """
    return DDIMScheduler.config_from_diffusers(cfg)


@keras.saving.register_keras_serializable(package="keras_sd")
class DDIMScheduler(Scheduler):
    """Denoising Diffusion Implicit Models sampler; eta = 0 is deterministic.

    Defaults are Stable Diffusion's settings. Like diffusers (and so that results
    match it), the step from timestep t goes to t - num_train_timesteps // N for
    every `timestep_spacing`; with "leading" that is exactly the next timestep.

    Args:
        num_train_timesteps: length of the training noise schedule.
        beta_start: beta at t = 0.
        beta_end: beta at the last training timestep.
        beta_schedule: "scaled_linear" or "linear".
        prediction_type: "epsilon", "v_prediction" or "sample".
        timestep_spacing: "leading", "trailing" or "linspace".
        steps_offset: added to "leading" timesteps.
        set_alpha_to_one: the last step goes to alpha_prod = 1 (a clean sample)
            instead of alpha_prod_0.
        clip_sample: clamp the predicted x_0 to [-clip_sample_range, clip_sample_range].
        eta: noise weight of eq. 16; 0 is DDIM, 1 is DDPM-like ancestral sampling.
        clip_sample_range: the clamp bound used when `clip_sample` is True.

    Example:
    >>> sched = DDIMScheduler()
    >>> tables = sched.schedule(50)
    >>> def body(i, state):  # doctest: +SKIP
    ...     t = ops.take(tables["timesteps"], i)
    ...     return sched.step(state, unet(state["sample"], t, context), i, tables)
    >>> latents = ops.fori_loop(0, 50, body, sched.init_state(noise, tables))  # doctest: +SKIP
    """

    diffusers_defaults = DIFFUSERS_DDIM_DEFAULTS

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        set_alpha_to_one: bool = False,
        clip_sample: bool = False,
        eta: float = 0.0,
        clip_sample_range: float = 1.0,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
        )
        for name, flag in (("set_alpha_to_one", set_alpha_to_one), ("clip_sample", clip_sample)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"`{name}` must be True or False, got {flag!r}.")
        if not isinstance(eta, numbers.Real) or not eta >= 0.0:
            raise ValueError(f"`eta` must be a number >= 0, got {eta!r}.")
        if not isinstance(clip_sample_range, numbers.Real) or not clip_sample_range > 0.0:
            raise ValueError(
                f"`clip_sample_range` must be a number > 0, got {clip_sample_range!r}."
            )
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.clip_sample = bool(clip_sample)
        self.eta = float(eta)
        self.clip_sample_range = float(clip_sample_range)
        self.needs_step_noise = self.eta > 0.0
        # alpha_prod of the step after the last one, where t - T // N < 0.
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def schedule(self, num_steps: int, strength: float = 1.0) -> dict:
        """Per-step tables of a DDIM run of `num_steps` steps.

        Args:
            num_steps: N, steps of a full (text-to-image) run.
            strength: for image-to-image, the share of the run to keep; the last
                int(N * strength) steps are returned, as diffusers' img2img does.

        Returns:
            dict of [n] arrays, n = int(N * strength): "timesteps" (int32,
            descending), "alpha_prod_t", "alpha_prod_t_prev" and "sigma" (eq. 16
            times eta), float32.

        Example:
        >>> DDIMScheduler().schedule(10, strength=0.5)["timesteps"].tolist()
        [401, 301, 201, 101, 1]
        """
        self.check_num_steps(num_steps)
        start = img2img_start(num_steps, strength)
        t = spaced_timesteps(
            self.num_train_timesteps, num_steps, self.timestep_spacing, self.steps_offset
        )
        prev_t = t - self.num_train_timesteps // num_steps
        alphas = self.alphas_cumprod.astype(np.float64)
        a_t = alphas[t]
        a_prev = np.where(prev_t >= 0, alphas[np.maximum(prev_t, 0)], self.final_alpha_cumprod)
        # DDIM eq. 16: sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev).
        sigma = self.eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        tables = {
            "timesteps": t,
            "alpha_prod_t": a_t.astype(np.float32),
            "alpha_prod_t_prev": a_prev.astype(np.float32),
            "sigma": sigma.astype(np.float32),
        }
        return {key: value[start:] for key, value in tables.items()}

    def step(self, state: dict, model_output, index, schedule: dict, noise=None) -> dict:
        """One DDIM update from step `index` to the next, less noisy, step.

        Args:
            state: `{"sample": x_t}`, x_t of shape [B, ...].
            model_output: the model's prediction at x_t (any float dtype).
            index: step number into `schedule` (Python int or integer tensor,
                traced inside a compiled loop is fine).
            schedule: output of `schedule()` (numpy arrays or tensors).
            noise: standard normal noise shaped like the sample; required when
                eta > 0, ignored otherwise.

        Returns:
            `{"sample": x_{t_prev}}` in the dtype of x_t, computed in float32.
        """
        if self.needs_step_noise and noise is None:
            raise ValueError("`noise` is required when the scheduler's eta > 0.")
        sample = state["sample"]
        a_t = take_step_constant(schedule, "alpha_prod_t", index)
        a_prev = take_step_constant(schedule, "alpha_prod_t_prev", index)
        sigma = take_step_constant(schedule, "sigma", index)
        x0, eps = self.split_prediction(sample, model_output, a_t)
        if self.clip_sample:
            x0 = ops.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # DDIM eq. 12: sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise.
        prev = ops.sqrt(a_prev) * x0 + ops.sqrt(1.0 - a_prev - sigma * sigma) * eps
        if self.needs_step_noise:
            prev = prev + sigma * ops.cast(noise, "float32")
        return {"sample": ops.cast(prev, sample.dtype)}
