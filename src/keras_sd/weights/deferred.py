"""SD models built with variables that have no values yet, then given their values
straight from a checkpoint.

`build_models_deferred` creates the models inside a `StatelessScope` (Keras defers
variable initialization there), and `initialize_deferred` gives each variable its
value from a zero-argument function, running those functions (file reads, casts,
transposes) in worker threads a few tensors ahead. A full-size model then costs one
read and one layout conversion per tensor instead of a random initialization plus a
copy, and peak memory stays near the model's own size instead of twice that.
"""

from __future__ import annotations

import contextlib
import gc
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import keras

from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.weights.state_dict import refusing

# StableDiffusion attribute -> model class and its config key.
MODELS = {
    "text_encoder": (CLIPTextEncoder, "text_encoder"),
    "diffusion_model": (UNet, "unet"),
    "decoder": (VAEDecoder, "vae"),
    "image_encoder": (VAEEncoder, "vae"),
}


@contextlib.contextmanager
def paused_gc():
    """Pause Python's cyclic garbage collector while a model loads; its previous state
    comes back on exit (an outer pause or a user's `gc.disable()` is kept).

    Building a full-size SD creates enough long-lived objects (Keras layers, variables
    and their trackers) to start full collections, and each walks the whole heap in the
    main thread, holding the GIL that the conversion workers need between their copies.
    A load leaves almost no cyclic garbage, which the next collection after it finds.
    Usable as a decorator.

    Example:
    >>> import gc
    >>> with paused_gc():
    ...     gc.isenabled()
    False
    >>> gc.isenabled()
    True
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_models_deferred(
    config: dict, source: str | None = None, policy: str | None = None
) -> dict:
    """`{StableDiffusion attribute: model}` built from `config`, variables without values.

    `policy` is the models' dtype policy (see `keras_sd.weights.precision.load_policy`);
    None: the global one.

    Every model must then go through `initialize_deferred` or `forget_deferred`.
    With `source` (the file the config was read from), a config that does not build
    raises a `CheckpointError` naming that file.
    """
    what = "its stored config does not build the models"
    with contextlib.nullcontext() if source is None else refusing(source, what):
        with keras.StatelessScope(initialize_variables=False):
            return {attr: build_model(attr, config, policy) for attr in MODELS}


def build_model(attr: str, config: dict, policy: str | None = None):
    """The model held by the `StableDiffusion` attribute `attr`, built from `config`
    under the dtype policy `policy` (None: the global one).

    Example:
    >>> from keras_sd.presets import resolve_model_config
    >>> build_model("diffusion_model", resolve_model_config("tiny"), "bfloat16").dtype
    'bfloat16'
    """
    cls, key = MODELS[attr]
    return cls(**config[key]) if policy is None else cls(**{**config[key], "dtype": policy})


def forget_deferred(models) -> None:
    """Drop the models' variables from Keras' list of variables awaiting initialization.

    Keras initializes that list at the next `StatelessScope` exit; models abandoned
    after an error (or already initialized here) must not be in it.
    """
    from keras.src.backend.common import global_state

    ours = {id(v) for model in models for v in model.weights}
    pending = global_state.get_global_attribute("uninitialized_variables") or []
    pending[:] = [v for v in pending if id(v) not in ours]


def initialize_deferred(models, pairs, workers: int = 1) -> None:
    """Give deferred variables their values: `pairs` of (variable, zero-argument function
    returning the value in the variable's layout and dtype).

    The value functions (file reads, casts, transposes; all release the GIL) run in
    `workers` threads a few tensors ahead of the variables they fill, so they overlap
    the Python work of creating variables while at most a handful of converted tensors
    wait in memory. One worker is the default: the backends' transposes are already
    multi-threaded, so more workers only compete with them for the cores.
    """
    models = list(models)
    given = {id(variable) for variable, _ in pairs}
    left = [v.path for m in models for v in m.weights if id(v) not in given]
    try:
        if left:  # a variable without a value would fail far from here, on first use
            raise ValueError(f"{len(left)} variables would stay without values: {left[:4]}")
        with ThreadPoolExecutor(workers) as pool:
            pending = deque()
            for variable, value in pairs:
                pending.append((variable, pool.submit(value)))
                if len(pending) > 2 * workers:
                    _fill(*pending.popleft())
            while pending:
                _fill(*pending.popleft())
    finally:
        forget_deferred(models)


def _fill(variable, future) -> None:
    tensor = future.result()
    # Keras calls a deferred variable's initializer once, with (shape, dtype).
    variable._initializer = lambda shape, dtype=None: tensor
    variable._deferred_initialize()
