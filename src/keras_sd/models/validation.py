"""Model configuration checks: every key's type, range and upper bound, in one table.

Configs come from files (a checkpoint's json, a keras-sd file's metadata) as well as
from code, so a constructor checks its arguments here before it builds a layer: a
config asking for 10^5 layers, zero groups or a list where a dict belongs gets a
`ValueError`/`TypeError` naming the key, not gigabytes of allocation or an
`AttributeError` deep inside. The upper bounds sit far above every Stable Diffusion
model (SD 1.x-2.x, SDXL) and only stop configs that could never be built.
"""

from __future__ import annotations

import numbers

# Estimated parameters one component may have (SDXL's UNet has 2.6e9).
MAX_PARAMETERS = 20_000_000_000


def _channels(most: int):
    return ("int", 1, most)


# key -> ("int", min, max) | ("float", min, max) | ("bool",) | ("str",) |
#        ("ints", min, max) (one per level) | ("int or ints", min, max) | ("bools",)
SPECS = {
    "unet": {
        "in_channels": _channels(64),
        "out_channels": _channels(64),
        "block_out_channels": ("ints", 1, 8192),
        "layers_per_block": ("int", 1, 32),
        "attention_levels": ("bool or bools",),
        "num_heads": ("int or ints", 1, 1024),
        "cross_attention_dim": _channels(16384),
        "transformer_layers_per_block": ("int or ints", 1, 64),
        "use_linear_projection": ("bool",),
        "upcast_attention": ("bool",),
        "norm_num_groups": ("int", 1, 8192),
        "norm_eps": ("float", 0.0, 1.0),
    },
    "vae": {
        "in_channels": _channels(64),
        "out_channels": _channels(64),
        "latent_channels": _channels(64),
        "block_out_channels": ("ints", 1, 8192),
        "layers_per_block": ("int", 1, 32),
        "scaling_factor": ("float", 0.0, 1000.0),
        "norm_num_groups": ("int", 1, 8192),
        "norm_eps": ("float", 0.0, 1.0),
        "force_upcast": ("bool",),
    },
    "text_encoder": {
        "vocab_size": ("int", 1, 4_000_000),
        "max_length": ("int", 1, 4096),
        "hidden_dim": _channels(16384),
        "num_layers": ("int", 1, 256),
        "num_heads": ("int", 1, 1024),
        "intermediate_dim": _channels(65536),
        "activation": ("str",),
        "layer_norm_epsilon": ("float", 0.0, 1.0),
    },
    "tokenizer": {
        "vocab_path": ("str or none",),
        "max_length": ("int", 2, 4096),
        "pad_token": ("str",),
        "added_tokens": ("strs",),
    },
}
# The keys a config must give (the others have defaults).
REQUIRED = {
    "unet": (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "attention_levels",
        "num_heads",
        "cross_attention_dim",
    ),
    "vae": (
        "in_channels",
        "out_channels",
        "latent_channels",
        "block_out_channels",
        "layers_per_block",
        "scaling_factor",
    ),
    "text_encoder": (
        "vocab_size",
        "max_length",
        "hidden_dim",
        "num_layers",
        "num_heads",
        "intermediate_dim",
    ),
    "tokenizer": (),
}
MAX_LEVELS = 8  # resolution levels of a UNet or VAE
MAX_ADDED_TOKENS = 100_000


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_number(where: str, value, kind: str, low, high) -> None:
    if kind == "int" and not _is_int(value):
        raise TypeError(f"{where} must be an int; received {value!r}.")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{where} must be a number; received {value!r}.")
    if kind == "int" and not low <= value <= high:
        raise ValueError(f"{where} must be in [{low}, {high}]; received {value}.")
    if kind == "float" and not low < value <= high:  # also refuses NaN
        raise ValueError(f"{where} must be a number in ({low:g}, {high:g}]; received {value!r}.")


def _check_value(where: str, value, rule: tuple) -> None:
    kind = rule[0]
    if kind in ("int", "float"):
        _check_number(where, value, kind, *rule[1:])
    elif kind == "bool" and not isinstance(value, bool):
        raise TypeError(f"{where} must be True or False; received {value!r}.")
    elif kind in ("str", "str or none") and not (
        isinstance(value, str) or (value is None and kind == "str or none")
    ):
        raise TypeError(f"{where} must be a string; received {value!r}.")
    elif kind in ("ints", "strs", "bool or bools", "int or ints"):
        scalar = kind in ("bool or bools", "int or ints") and not isinstance(value, (list, tuple))
        items = [value] if scalar else value
        if not isinstance(items, (list, tuple)) or not (items or kind == "strs"):
            raise TypeError(f"{where} must be a non-empty list; received {value!r}.")
        most = MAX_LEVELS if kind != "strs" else MAX_ADDED_TOKENS
        if len(items) > most:
            raise ValueError(f"{where} has {len(items)} entries; at most {most} are accepted.")
        item_rule = {"ints": ("int",), "int or ints": ("int",), "strs": ("str",)}.get(
            kind, ("bool",)
        )
        for i, item in enumerate(items):
            _check_value(f"{where}[{i}]", item, item_rule + tuple(rule[1:]))


def _levels(value, count: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * count


def _check_consistency(component: str, config: dict) -> None:
    """The rules between keys: per-level lengths, divisibility, the size estimate."""
    where = f"{component} config"
    if component == "text_encoder":
        hidden, heads = config["hidden_dim"], config["num_heads"]
        if hidden % heads:
            raise ValueError(f"{where}: hidden_dim {hidden} is not divisible by num_heads {heads}.")
        size = config["num_layers"] * 12 * hidden**2 + (config["vocab_size"] + 4096) * hidden
    elif component in ("unet", "vae"):
        channels = tuple(config["block_out_channels"])
        groups = config.get("norm_num_groups", 32)
        heads = _levels(config.get("num_heads", 1), len(channels))
        for key in ("attention_levels", "num_heads", "transformer_layers_per_block"):
            if key in config and len(_levels(config[key], len(channels))) != len(channels):
                raise ValueError(
                    f"{where}: {key} must be one value or one per level ({len(channels)}); "
                    f"received {config[key]!r}."
                )
        for level, (width, head) in enumerate(zip(channels, heads, strict=True)):
            if width % groups or width % head:
                raise ValueError(
                    f"{where}: block_out_channels[{level}] = {width} must be divisible by "
                    f"norm_num_groups ({groups}) and its num_heads ({head})."
                )
        depth = _levels(config.get("transformer_layers_per_block", 1), len(channels))
        per_level = 2 * config["layers_per_block"] + 2
        size = sum(per_level * (18 + 12 * d) * c**2 for c, d in zip(channels, depth, strict=True))
    else:
        return
    if size > MAX_PARAMETERS:
        raise ValueError(
            f"{where} describes a model of about {size:.2g} parameters, more than the "
            f"{MAX_PARAMETERS:.0g} keras-sd builds; check its sizes."
        )


def check_config(component: str, config) -> None:
    """Check one component's constructor arguments before anything is built.

    Args:
        component: "unet", "vae", "text_encoder" or "tokenizer".
        config: the arguments, a dict (a constructor passes `locals()`; keys outside the
            table, such as Keras' `name` and `dtype`, are left to the constructor).

    Raises:
        TypeError: `config` is not a dict, or a value has the wrong type.
        ValueError: a required key is missing, or a value is out of range, or the
            values disagree (channels not divisible by groups or heads, ...).

    Example:
    >>> from keras_sd.models.unet import TINY_CONFIG
    >>> check_config("unet", TINY_CONFIG)
    >>> check_config("unet", {**TINY_CONFIG, "layers_per_block": 10**5})
    Traceback (most recent call last):
    ...
    ValueError: unet config: layers_per_block must be in [1, 32]; received 100000.
    """
    if not isinstance(config, dict):
        raise TypeError(
            f"the {component} config must be a dict of constructor arguments; received "
            f"{type(config).__name__}."
        )
    missing = [key for key in REQUIRED[component] if key not in config]
    if missing:
        raise ValueError(f"{component} config lacks the keys {missing}.")
    for key, rule in SPECS[component].items():
        if key in config:
            _check_value(f"{component} config: {key}", config[key], rule)
    _check_consistency(component, config)


def check_model_config(config: dict) -> None:
    """Check a whole model configuration (see `keras_sd.presets`): each component's
    arguments, and that the components fit together (text width = UNet context width,
    UNet channels = VAE latents).

    Example:
    >>> from keras_sd.presets import MODEL_CONFIGS
    >>> check_model_config(MODEL_CONFIGS["sd1"])
    """
    for component in SPECS:
        check_config(component, config[component])
    if not isinstance(config["scheduler"], dict):
        raise TypeError(
            f"the scheduler config must be a dict; received {type(config['scheduler']).__name__}."
        )
    text, unet, vae = config["text_encoder"], config["unet"], config["vae"]
    latent = vae["latent_channels"]
    problems = []
    if text["hidden_dim"] != unet["cross_attention_dim"]:
        problems.append(
            f"text_encoder hidden_dim {text['hidden_dim']} != unet cross_attention_dim "
            f"{unet['cross_attention_dim']}"
        )
    if unet["in_channels"] not in (latent, 2 * latent + 1) or unet["out_channels"] != latent:
        problems.append(
            f"unet in/out channels {unet['in_channels']}/{unet['out_channels']} do not fit "
            f"{latent} VAE latent channels (in: {latent} or {2 * latent + 1}, out: {latent})"
        )
    if problems:
        raise ValueError("model config components do not fit together: " + "; ".join(problems))
