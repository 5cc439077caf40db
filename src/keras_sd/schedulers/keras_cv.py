"""KerasCV 0.9's own sampler, so that KerasCV weights and noise give KerasCV's images.

KerasCV's `StableDiffusion.generate_image` runs deterministic DDIM (eta = 0,
Song et al. 2020, eq. 12) over its own timesteps: N points rounded from an even
grid over [0, T - 1] (so the last step is at t = 0 and the first at T - 1), each
step going to the next listed timestep and the last to alpha_prod = 1.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_sd.schedulers.base import img2img_start
from keras_sd.schedulers.ddim import DDIMScheduler


@keras.saving.register_keras_serializable(package="keras_sd")
class KerasCVScheduler(DDIMScheduler):
    """The sampler of KerasCV's `StableDiffusion.generate_image` (registered as "keras_cv").

    Args:
        num_train_timesteps: length of the training noise schedule.
        beta_start: beta at t = 0.
        beta_end: beta at the last training timestep.
        beta_schedule: "scaled_linear" (KerasCV's table) or "linear".
        prediction_type: "epsilon" (KerasCV's models), "v_prediction" or "sample".

    Example:
    >>> KerasCVScheduler().schedule(3)["timesteps"].tolist()
    [999, 500, 0]
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            set_alpha_to_one=True,
        )

    def max_num_steps(self) -> int:
        """Every training timestep: KerasCV's spacing ends at T - 1 for any step count."""
        return self.num_train_timesteps

    def schedule(self, num_steps: int, strength: float = 1.0) -> dict:
        """Per-step tables: KerasCV's timesteps, alpha_prod at each and at the next.

        Timesteps are `round(k * (T - 1) / (N - 1))` for k = N-1 .. 0 (`[0]` when
        N = 1), rounded half to even as numpy does; the step from the last goes to
        alpha_prod = 1.
        """
        self.check_num_steps(num_steps)
        start = img2img_start(num_steps, strength)
        last = self.num_train_timesteps - 1
        ratio = last / (num_steps - 1) if num_steps > 1 else 0.0
        t = np.round(np.arange(num_steps) * ratio).astype(np.int32)[::-1]
        a_t = self.alphas_cumprod[t]
        a_prev = np.concatenate([a_t[1:], np.ones(1, np.float32)])
        tables = {
            "timesteps": t,
            "alpha_prod_t": a_t,
            "alpha_prod_t_prev": a_prev,
            "sigma": np.zeros(num_steps, np.float32),
        }
        return {key: value[start:] for key, value in tables.items()}
