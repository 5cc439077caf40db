"""Noise schedulers: array math over precomputed tables, with an explicit loop state."""

from keras_sd.schedulers.base import Scheduler, alphas_cumprod_table, spaced_timesteps
from keras_sd.schedulers.ddim import DDIMScheduler, config_from_diffusers
from keras_sd.schedulers.keras_cv import KerasCVScheduler
from keras_sd.schedulers.registry import (
    build_scheduler,
    get_scheduler,
    register_scheduler,
    scheduler_names,
)

__all__ = [
    "DDIMScheduler",
    "KerasCVScheduler",
    "Scheduler",
    "alphas_cumprod_table",
    "build_scheduler",
    "config_from_diffusers",
    "get_scheduler",
    "register_scheduler",
    "scheduler_names",
    "spaced_timesteps",
]
