"""Noise-schedule tables and the interface every keras-sd scheduler follows.

A scheduler is a frozen config plus numpy tables derived from it. Python-level
work (validating arguments, choosing the timesteps of a run) happens once in
`schedule()`, which returns plain arrays. The sampling loop carries a *state*, a
dict of tensors that `init_state` makes from the starting latents: `{"sample": x}`
for single-step solvers, plus earlier model outputs (or counters) for multistep
ones. The per-step methods (`step`, `scale_model_input`) take the step index as a
possibly traced integer tensor and use `keras.ops` only, so a whole sampling loop
compiles into one program (`keras.ops.fori_loop` under jit). The training helpers
(`add_noise`, `velocity`, `training_target`, `predict_original`) take per-example
timesteps.

A scheduler's configuration is the arguments of its `__init__`, each stored as an
attribute of the same name: `get_config` reads them from the signature, so a
subclass that adds a parameter is part of the configuration (and of the compiled
programs' cache key) without writing `get_config` itself.

Notation: `alpha_prod_t` is the cumulative product of (1 - beta) up to t, the
alpha_t of the DDIM paper (Song et al. 2020) and alpha-bar_t of DDPM (Ho et al.
2020).
"""

from __future__ import annotations

import abc
import inspect
import numbers

import numpy as np
from keras import ops

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers config keys that switch on features keras-sd does not implement;
# a config that enables one is refused rather than silently sampled differently.
UNSUPPORTED_DIFFUSERS_KEYS = ("trained_betas", "thresholding", "rescale_betas_zero_snr")
# Longest training schedule accepted (SD uses 1000): bounds the tables built from a config.
MAX_TRAIN_TIMESTEPS = 10_000


def check_choice(name: str, value, allowed: tuple) -> None:
    """Raise ValueError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    """Raise ValueError unless `value` is an integer in [minimum, maximum]."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"`{name}` must be an integer >= {minimum}{upper}, got {value!r}.")


def beta_table(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str
) -> np.ndarray:
    """beta_t for t = 0 .. num_train_timesteps - 1, as float32 (see `alphas_cumprod_table`).

    Example:
    >>> float(beta_table(1000, 0.0001, 0.02, "linear")[0]) == float(np.float32(0.0001))
    True
    """
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
    roots = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps)
    return roots.astype(np.float32) ** 2


def alphas_cumprod_table(
    num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str
) -> np.ndarray:
    """alpha_prod_t for t = 0 .. num_train_timesteps - 1, as float32.

    Rounded like diffusers: betas and 1 - beta are float32, the running product
    is accumulated in float64 (as torch.cumprod does on CPU). The float32 rounding
    of 1 - beta moves the late entries by up to 1e-4 relative to an all-float64
    table (CompVis' training code), which alone puts single DDIM steps 1.5e-6
    away from diffusers; with this rounding they agree to float32 ulps.

    Args:
        num_train_timesteps: length of the training noise schedule.
        beta_start: beta at t = 0.
        beta_end: beta at the last training timestep.
        beta_schedule: "linear" (betas evenly spaced, DDPM) or "scaled_linear"
            (square roots of the betas evenly spaced, latent diffusion).

    Returns:
        float32 array of shape [num_train_timesteps].

    Example:
    >>> round(float(alphas_cumprod_table(1000, 0.00085, 0.012, "scaled_linear")[0]), 5)
    0.99915
    """
    betas = beta_table(num_train_timesteps, beta_start, beta_end, beta_schedule)
    alphas = (np.float32(1.0) - betas).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32)


def spaced_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int
) -> np.ndarray:
    """The descending training timesteps a run of `num_steps` visits.

    Spacings follow Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample
    Steps are Flawed"), table 2, with the rounding diffusers uses:
    "leading" k * (T // N) + offset, "trailing" round(T - k * T / N) - 1,
    "linspace" N rounded points from 0 to T - 1.

    Args:
        num_train_timesteps: T, the training schedule length.
        num_steps: N, the number of sampling steps.
        spacing: one of TIMESTEP_SPACINGS.
        steps_offset: added to every "leading" timestep (1 for Stable Diffusion).

    Returns:
        int32 array of shape [N], descending.

    Example:
    >>> spaced_timesteps(1000, 4, "leading", 1).tolist()
    [751, 501, 251, 1]
    """
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    k = np.arange(num_steps)
    if spacing == "leading":
        t = k[::-1] * (num_train_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":
        t = np.round(num_train_timesteps - k * (num_train_timesteps / num_steps)) - 1
    else:
        t = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
    t = t.astype(np.int32)
    if t[0] >= num_train_timesteps:
        raise ValueError(
            f"`num_steps`={num_steps} with `steps_offset`={steps_offset} reaches timestep "
            f"{t[0]}, past the last training timestep {num_train_timesteps - 1}."
        )
    return t


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first step kept when only a `strength` share of a run is used.

    Matches diffusers' img2img: the last int(num_steps * strength) steps run.
    Raises ValueError if `strength` is outside (0, 1] or keeps no step.
    """
    if not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` must be a number in (0, 1], got {strength!r}.")
    kept = int(num_steps * strength)
    if kept < 1:
        raise ValueError(
            f"`strength`={strength} keeps no step of `num_steps`={num_steps}; "
            f"raise one of them so that int(num_steps * strength) >= 1."
        )
    return num_steps - kept


def diffusers_config(cfg: dict, diffusers_defaults: dict) -> dict:
    """Read the keys of a diffusers scheduler config that a keras-sd scheduler uses.

    Args:
        cfg: the parsed scheduler_config.json (any scheduler class; extra keys
            such as `_class_name` or `skip_prk_steps` are ignored).
        diffusers_defaults: the keys to read, with the value the target diffusers
            class assumes when the key is absent (older configs omit keys).

    Returns:
        `{key: value}` for every key of `diffusers_defaults`.
    """
    for key in UNSUPPORTED_DIFFUSERS_KEYS:
        if cfg.get(key):
            raise ValueError(
                f"diffusers scheduler config sets `{key}`, which keras-sd does not support."
            )
    return {key: cfg.get(key, default) for key, default in diffusers_defaults.items()}


def take_step_constant(schedule: dict, key: str, index):
    """schedule[key][index] as a float32 scalar tensor; `index` may be traced."""
    return ops.cast(ops.take(ops.convert_to_tensor(schedule[key]), index), "float32")


def _broadcast_to_rank(per_example, ndim: int):
    # [B] -> [B, 1, ..., 1] so per-example constants scale whole latents.
    return ops.reshape(per_example, (-1,) + (1,) * (ndim - 1))


class Scheduler(abc.ABC):
    """Base of keras-sd schedulers: config, alpha table, training-side helpers.

    Subclasses implement `schedule` (numpy, once per run) and `step` (keras.ops,
    once per step, traceable).

    Args:
        num_train_timesteps: length of the training noise schedule.
        beta_start: beta at t = 0.
        beta_end: beta at the last training timestep.
        beta_schedule: one of BETA_SCHEDULES.
        prediction_type: what the model predicts, one of PREDICTION_TYPES.
        timestep_spacing: one of TIMESTEP_SPACINGS.
        steps_offset: added to "leading" timesteps.

    Example:
    >>> from keras_sd.schedulers import DDIMScheduler
    >>> isinstance(DDIMScheduler(), Scheduler), Scheduler.init_noise_sigma
    (True, 1.0)
    """

    # Standard deviation of the initial noise of a text-to-image run.
    init_noise_sigma = 1.0
    # Whether `step` needs the caller's `noise` (ancestral / eta > 0 sampling).
    needs_step_noise = False

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
    ):
        check_int("num_train_timesteps", num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
        for name, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not isinstance(beta, numbers.Real) or not 0.0 < beta < 1.0:
                raise ValueError(f"`{name}` must be a number in (0, 1), got {beta!r}.")
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_int("steps_offset", steps_offset, 0, num_train_timesteps - 1)
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.alphas_cumprod = alphas_cumprod_table(
            self.num_train_timesteps, self.beta_start, self.beta_end, beta_schedule
        )

    def get_config(self) -> dict:
        """The constructor arguments, as a plain dict, read from `__init__`'s signature.

        Every parameter of the concrete class's `__init__` (not `*args`/`**kwargs`)
        must be stored as an attribute of the same name.
        """
        config = {}
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if not hasattr(self, name):
                raise TypeError(
                    f"{type(self).__name__}.__init__ takes `{name}` but does not store it as "
                    f"`self.{name}`; a scheduler's configuration is its constructor arguments."
                )
            config[name] = getattr(self, name)
        return config

    @classmethod
    def from_config(cls, config: dict):
        """Rebuild a scheduler from `get_config()` output."""
        return cls(**config)

    # The keys of a diffusers scheduler config this class reads, with the value the
    # diffusers class assumes when a (older) config omits the key.
    diffusers_defaults: dict = {}

    @classmethod
    def config_from_diffusers(cls, cfg: dict) -> dict:
        """Constructor arguments equivalent to the diffusers class's `from_config(cfg)`."""
        return diffusers_config(cfg, cls.diffusers_defaults)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def max_num_steps(self) -> int:
        """The most steps a run can take: every timestep it visits must be a training
        timestep, and "leading" spacing adds `steps_offset` (1000 steps of a 1000-step
        schedule with offset 1 would reach timestep 1000)."""
        n, total = self.num_train_timesteps, self.num_train_timesteps
        while self.timestep_spacing == "leading" and n > 1:
            if (n - 1) * (total // n) + self.steps_offset < total:
                break
            n -= 1
        return n

    def check_num_steps(self, num_steps) -> None:
        """Raise ValueError unless 1 <= num_steps <= `max_num_steps()`."""
        check_int("num_steps", num_steps, 1, self.max_num_steps())

    def start_index(self, num_steps: int, strength: float = 1.0) -> int:
        """First step of `schedule(num_steps)` that a run with `strength` executes.

        Image-to-image runs the last int(num_steps * strength) steps of the full
        schedule (diffusers' rule), so every strength shares one set of tables and
        one compiled program.
        """
        self.check_num_steps(num_steps)
        return img2img_start(num_steps, strength)

    @abc.abstractmethod
    def schedule(self, num_steps: int, strength: float = 1.0) -> dict:
        """Per-step tables of a run; "timesteps" [N] int32 descending plus constants.

        With `strength` < 1 only the last int(N * strength) entries are returned;
        the sampler instead takes the full tables and starts at `start_index`.
        """

    def init_state(self, sample, schedule: dict) -> dict:
        """The loop state at the first step: `{"sample": sample}` plus whatever a
        multistep solver keeps (tensors of fixed shape and dtype, e.g. the previous
        model output as zeros and a step counter)."""
        return {"sample": ops.cast(sample, "float32")}

    @abc.abstractmethod
    def step(self, state: dict, model_output, index, schedule: dict, noise=None) -> dict:
        """The state at the next (less noisy) step, from the model output at `index`.

        `state["sample"]` is the current x_t; the returned dict has the same keys,
        shapes and dtypes (it is carried through `keras.ops.fori_loop`).
        """

    def scale_model_input(self, sample, index, schedule: dict):
        """The sample as the model should see it at step `index` (identity by default)."""
        return sample

    def _alpha_prod(self, timesteps, ndim: int):
        table = ops.convert_to_tensor(self.alphas_cumprod)
        return _broadcast_to_rank(ops.take(table, ops.cast(timesteps, "int32")), ndim)

    def add_noise(self, original, noise, timesteps):
        """Diffuse clean samples to `timesteps` in one jump.

        Implements q(x_t | x_0) of DDPM (Ho et al. 2020), eq. 4:
        x_t = sqrt(alpha_prod_t) * x_0 + sqrt(1 - alpha_prod_t) * noise.

        Args:
            original: clean samples x_0, [B, ...].
            noise: standard normal noise of the same shape.
            timesteps: [B] integer training timesteps.

        Returns:
            x_t in the dtype of `original`, computed in float32.

        Example:
        >>> x_t = scheduler.add_noise(latents, noise, ops.array([999, 0]))  # doctest: +SKIP
        """
        x0, eps = ops.cast(original, "float32"), ops.cast(noise, "float32")
        alpha = self._alpha_prod(timesteps, len(x0.shape))
        x_t = ops.sqrt(alpha) * x0 + ops.sqrt(1.0 - alpha) * eps
        return ops.cast(x_t, original.dtype)

    def velocity(self, sample, noise, timesteps):
        """The v target of Salimans & Ho 2022 (Progressive Distillation), sec. 4.

        v = sqrt(alpha_prod_t) * noise - sqrt(1 - alpha_prod_t) * x_0.

        Args:
            sample: clean samples x_0, [B, ...].
            noise: the noise that `add_noise` mixed in.
            timesteps: [B] integer training timesteps.

        Returns:
            v in the dtype of `sample`, computed in float32.
        """
        x0, eps = ops.cast(sample, "float32"), ops.cast(noise, "float32")
        alpha = self._alpha_prod(timesteps, len(x0.shape))
        v = ops.sqrt(alpha) * eps - ops.sqrt(1.0 - alpha) * x0
        return ops.cast(v, sample.dtype)

    def training_target(self, latents, noise, timesteps):
        """What the model is trained to output for `add_noise(latents, noise, timesteps)`.

        Returns `noise` for "epsilon", `velocity(...)` for "v_prediction" and
        `latents` for "sample".
        """
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(latents, noise, timesteps)
        return latents

    def split_prediction(self, sample, model_output, alpha_prod_t):
        """(predicted x_0, predicted noise) from a model output, all float32.

        epsilon: x_0 from DDIM (Song et al. 2020) eq. 12's "predicted x_0" term.
        v_prediction: x_0 = sqrt(a) x_t - sqrt(1 - a) v and
            eps = sqrt(a) v + sqrt(1 - a) x_t (Salimans & Ho 2022, sec. 4).
        sample: eps recovered by inverting x_t = sqrt(a) x_0 + sqrt(1 - a) eps.

        `alpha_prod_t` must broadcast against `sample` (a scalar or [B, 1, ...]).
        """
        x_t, out = ops.cast(sample, "float32"), ops.cast(model_output, "float32")
        sqrt_a, sqrt_1ma = ops.sqrt(alpha_prod_t), ops.sqrt(1.0 - alpha_prod_t)
        if self.prediction_type == "epsilon":
            return (x_t - sqrt_1ma * out) / sqrt_a, out
        if self.prediction_type == "v_prediction":
            return sqrt_a * x_t - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x_t
        return out, (x_t - sqrt_a * out) / sqrt_1ma

    def predict_original(self, sample, model_output, timesteps):
        """The model's estimate of the clean sample x_0, float32.

        Args:
            sample: noisy samples x_t, [B, ...].
            model_output: the model's output for them.
            timesteps: [B] integer training timesteps.

        Returns:
            predicted x_0, float32, shape of `sample`.
        """
        alpha = self._alpha_prod(timesteps, len(sample.shape))
        return self.split_prediction(sample, model_output, alpha)[0]
