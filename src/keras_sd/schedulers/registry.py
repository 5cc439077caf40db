"""Scheduler names: short names and diffusers class names to keras-sd classes.

A model configuration's "scheduler" entry is a dict of constructor arguments with an
optional "class_name" (a registered short name or diffusers class name; DDIM when
absent), so configs, checkpoint folders and `StableDiffusion(scheduler="ddim")` all
name schedulers the same way.
"""

from __future__ import annotations

import inspect

from keras_sd.schedulers.base import Scheduler
from keras_sd.schedulers.ddim import DDIMScheduler
from keras_sd.schedulers.keras_cv import KerasCVScheduler

DEFAULT = "ddim"
_CLASSES: dict[str, type] = {}  # short name -> class
_ALIASES: dict[str, str] = {}  # diffusers class name -> short name


def register_scheduler(name: str, cls: type, diffusers_name: str | None = None) -> None:
    """Make `cls` available as `name` (and as `diffusers_name` in diffusers configs).

    Example:
    >>> class MyDDIM(DDIMScheduler):
    ...     pass
    >>> register_scheduler("my-ddim", MyDDIM)
    >>> type(get_scheduler("my-ddim")).__name__
    'MyDDIM'
    """
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise TypeError(f"cls must be a keras_sd Scheduler subclass; received {cls!r}.")
    _CLASSES[name] = cls
    if diffusers_name is not None:
        _ALIASES[diffusers_name] = name


def scheduler_names() -> list[str]:
    """The registered short names and diffusers class names.

    Example:
    >>> {"ddim", "DDIMScheduler"} <= set(scheduler_names())
    True
    """
    return sorted({*_CLASSES, *_ALIASES})


def scheduler_class(name: str) -> type:
    """The class registered as `name` (a short name or a diffusers class name).

    Example:
    >>> scheduler_class("DDIMScheduler").__name__
    'DDIMScheduler'
    """
    short = _ALIASES.get(name, name) if isinstance(name, str) else None
    if short not in _CLASSES:
        raise ValueError(f"scheduler must be one of {scheduler_names()}; received {name!r}.")
    return _CLASSES[short]


def get_scheduler(scheduler=None, **config) -> Scheduler:
    """A scheduler instance from an instance (returned as is), a name, or None (DDIM).

    Args:
        scheduler: a `Scheduler`, a name from `scheduler_names()`, or None.
        **config: constructor arguments for a named scheduler.

    Example:
    >>> get_scheduler("DDIMScheduler", eta=0.5).eta
    0.5
    """
    if isinstance(scheduler, Scheduler):
        if config:
            raise ValueError("scheduler settings apply to a scheduler name, not an instance.")
        return scheduler
    if scheduler is None:
        scheduler = DEFAULT
    if not isinstance(scheduler, str):
        raise TypeError(
            f"scheduler must be a Scheduler or one of {scheduler_names()}; received "
            f"{type(scheduler).__name__}."
        )
    return scheduler_class(scheduler)(**config)


def build_scheduler(config: dict, name: str | None = None) -> Scheduler:
    """The scheduler a model configuration's "scheduler" entry describes.

    Args:
        config: constructor arguments plus an optional "class_name".
        name: another registered scheduler to build with the config's settings
            (those its constructor takes: the noise schedule and prediction type).

    Example:
    >>> build_scheduler({"prediction_type": "v_prediction"}, name="ddim").prediction_type
    'v_prediction'
    """
    config = dict(config)
    own = config.pop("class_name", None)
    if name is None:
        return get_scheduler(own, **config)
    accepted = inspect.signature(scheduler_class(name).__init__).parameters
    return get_scheduler(name, **{k: v for k, v in config.items() if k in accepted})


def config_from_diffusers(cfg: dict) -> dict:
    """A "scheduler" config entry from a diffusers `scheduler_config.json`.

    A registered `_class_name` is kept; any other (Stable Diffusion 1.x folders ship
    `PNDMScheduler`, which keras-sd does not implement) falls back to DDIM with the
    file's noise-schedule settings, as diffusers pipelines allow swapping schedulers
    over one config.

    Example:
    >>> config_from_diffusers({"_class_name": "PNDMScheduler", "steps_offset": 1})["class_name"]
    'ddim'
    """
    name = cfg.get("_class_name")
    short = _ALIASES.get(name, name) if name in _ALIASES or name in _CLASSES else DEFAULT
    cls = _CLASSES[short]
    return {"class_name": short, **cls.config_from_diffusers(cfg)}


register_scheduler("ddim", DDIMScheduler, "DDIMScheduler")
register_scheduler("keras_cv", KerasCVScheduler)
