"""Noise schedulers: stateless array math over precomputed tables."""

from keras_sd.schedulers.base import Scheduler, alphas_cumprod_table, spaced_timesteps
from keras_sd.schedulers.ddim import DDIMScheduler, config_from_diffusers

__all__ = [
    "DDIMScheduler",
    "Scheduler",
    "alphas_cumprod_table",
    "config_from_diffusers",
    "spaced_timesteps",
]
