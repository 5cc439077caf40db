"""The dtype policy that loaded models are built under.

The rule: a model loaded for inference keeps its variables in the dtype it computes in.
Under a mixed policy ("mixed_float16", "mixed_bfloat16") Keras keeps float32 variables
and casts them to the compute dtype in every call; those float32 masters exist for the
optimizer, so a loaded model gets the pure "float16"/"bfloat16" policy instead: half the
memory, and no casts per call. Normalization statistics and softmax still run in float32
inside the layers, and a VAE built with `force_upcast` still runs in float32 under
float16 compute (its activations outgrow float16's range), as under the mixed policies.

Training needs the masters: load with `dtype="mixed_bfloat16"` (or "mixed_float16") to
get float32 variables with low-precision compute, as `StableDiffusion(...)` built directly
always has.
"""

from __future__ import annotations

import keras

from keras_sd.models import vae
from keras_sd.weights import deferred

LOAD_DTYPES = (None, "float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16")
_MIXED_PREFIX = "mixed_"


def check_load_dtype(dtype) -> None:
    """Raise a ValueError naming `dtype` unless it is one of `LOAD_DTYPES`.

    Example:
    >>> check_load_dtype("mixed_bfloat16")
    >>> check_load_dtype("float64")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: dtype must be one of (None, 'float32', ...); received 'float64'.
    """
    if not (dtype is None or (isinstance(dtype, str) and dtype in LOAD_DTYPES)):
        raise ValueError(f"dtype must be one of {LOAD_DTYPES}; received {dtype!r}.")


def load_policy(dtype: str | None = None) -> str:
    """The name of the dtype policy to build loaded models under.

    Args:
        dtype: one of `LOAD_DTYPES`. None applies the rule of the module docstring to
            the global Keras policy: a mixed policy gives its pure compute dtype, any
            other policy is kept. A name is used as given ("mixed_*" keeps float32
            variables, for training).

    Example:
    >>> import keras
    >>> keras.config.set_dtype_policy("mixed_bfloat16")
    >>> load_policy(), load_policy("mixed_bfloat16"), load_policy("float16")
    ('bfloat16', 'mixed_bfloat16', 'float16')
    >>> keras.config.set_dtype_policy("float32")
    >>> load_policy()
    'float32'
    """
    check_load_dtype(dtype)
    if dtype is not None:
        return dtype
    name = keras.config.dtype_policy().name
    return name[len(_MIXED_PREFIX) :] if name.startswith(_MIXED_PREFIX) else name


def variable_dtypes(config: dict, policy: str) -> dict:
    """`{StableDiffusion attribute: variable dtype}` of the models `config` builds under
    `policy` (an upcasting VAE keeps float32), known before any model is built.

    Example:
    >>> from keras_sd.presets import resolve_model_config
    >>> variable_dtypes(resolve_model_config("tiny"), "float16")["decoder"]
    'float32'
    """
    low = keras.dtype_policies.get(policy).variable_dtype
    upcast = vae.upcasts(policy, config["vae"].get("force_upcast", True))
    return {
        attr: "float32" if upcast and key == "vae" else low
        for attr, (_, key) in deferred.MODELS.items()
    }


__all__ = ["LOAD_DTYPES", "check_load_dtype", "load_policy", "variable_dtypes"]
