"""Argument checks and batch bookkeeping shared by the pipeline's methods.

Every check runs before any model does, so a bad argument costs no compute: types,
ranges, the image size rule of the model, finiteness and an estimate of the memory a
run needs.
"""

from __future__ import annotations

import numbers
import os

import keras
import numpy as np
from keras import ops

from keras_sd.weights import precision

# Largest image side accepted; SD models are trained at 512-1024 px.
MAX_SIDE = 16_384
# Classifier-free guidance weights accepted; SD is used at 1-20, and larger weights only
# saturate the image.
MAX_GUIDANCE = 100.0
MAX_SEED = 2**64 - 2  # numpy seeds are unbounded; the step noise uses seed + 1
KEYWORDS = ("diffusion_noise", "scheduler", "width", "height", "progress")


def validate_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; received {value!r}.")


def check_size(name: str, value, multiple: int, latent_factor: int) -> None:
    """An image side: a positive int, a multiple of the model's `size_multiple`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; received {value!r}.")
    if value <= 0 or value % multiple or value > MAX_SIDE:
        nearest = min(max(multiple, round(value / multiple) * multiple), MAX_SIDE)
        raise ValueError(
            f"{name} must be a positive multiple of {multiple} up to {MAX_SIDE} for this "
            f"model (the VAE shrinks images {latent_factor}x and the UNet's downsamplings "
            f"{multiple // latent_factor}x more); received {value}. Nearest valid: {nearest}."
        )


def check_construction(config, img_width, img_height, tokenizer, *models) -> None:
    """The constructor's components (None or ready ones) and default image size, checked
    against the configuration before any model is built."""
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer must be None or a tokenizer; received {tokenizer!r}.")
    names = ("text_encoder", "diffusion_model", "decoder", "image_encoder")
    for name, model in zip(names, models, strict=True):
        if model is not None and not isinstance(model, keras.layers.Layer):
            raise TypeError(
                f"{name} must be None or a Keras model; received {type(model).__name__}."
            )
    unet, decoder = models[1], models[2]
    vae_levels = len(getattr(decoder, "block_out_channels", config["vae"]["block_out_channels"]))
    unet_levels = len(getattr(unet, "block_out_channels", config["unet"]["block_out_channels"]))
    factor = 2 ** (vae_levels - 1)
    for name, side in (("img_width", img_width), ("img_height", img_height)):
        check_size(name, side, factor * 2 ** (unet_levels - 1), factor)


def check_checkpoint_kwargs(kwargs: dict, components: tuple) -> None:
    """`from_checkpoint`'s keyword arguments, checked before any file is read: the
    deeper checks (config values, the image size rule) follow once the model is known."""
    for key, value in kwargs.items():
        if key in components:
            if not isinstance(value, dict):
                raise TypeError(f"{key}= must be a dict of constructor arguments; got {value!r}.")
        elif key in ("img_size", "img_width", "img_height") and value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{key} must be None or an int; received {value!r}.")
            if not 0 < value <= MAX_SIDE:
                raise ValueError(f"{key} must be in [1, {MAX_SIDE}]; received {value}.")
        elif key == "use_ema":
            check_flag(key, value)
        elif key == "prediction_type":
            if value not in (None, "epsilon", "v_prediction"):
                raise ValueError(
                    f"prediction_type must be None, 'epsilon' or 'v_prediction'; received "
                    f"{value!r}."
                )
        elif key == "config":
            if value is not None and not isinstance(value, (str, dict)):
                raise TypeError(f"config must be a name or a dict; received {value!r}.")
        elif key == "dtype":
            precision.check_load_dtype(value)
        else:
            allowed = ["config", "prediction_type", "img_size", "img_width", "img_height"]
            allowed += ["use_ema", "dtype"]
            raise TypeError(
                f"unexpected keyword argument {key!r}; accepted: {allowed} and "
                f"the component overrides {list(components)}."
            )


def check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None or an int; received {seed!r}.")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}]; received {seed}.")


def check_guidance(guidance) -> None:
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"unconditional_guidance_scale must be a number; received {guidance!r}.")
    if not 0.0 <= guidance <= MAX_GUIDANCE:  # also refuses NaN
        raise ValueError(
            f"unconditional_guidance_scale must be a finite number in [0, {MAX_GUIDANCE:g}] "
            f"(1 turns guidance off); received {guidance!r}."
        )


def check_flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; received {value!r}.")


def check_sampling_args(batch_size, num_steps, guidance, seed, diffusion_noise) -> None:
    validate_positive_int("batch_size", batch_size)
    validate_positive_int("num_steps", num_steps)
    check_guidance(guidance)
    check_seed(seed)
    if diffusion_noise is not None and seed is not None:
        raise ValueError("Pass either diffusion_noise or seed, not both.")


def check_run(sd, batch_size, num_steps, guidance, seed, items=1, **keywords):
    """Check a run's arguments before any model runs; returns (scheduler, width, height).

    `keywords`: those of `KEYWORDS` (others are refused), with `width`/`height`
    defaulting to the pipeline's size; `items` outputs of `batch_size` images each.
    """
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; accepted: {list(KEYWORDS)}.")
    check_sampling_args(batch_size, num_steps, guidance, seed, keywords.get("diffusion_noise"))
    check_flag("progress", keywords.get("progress", True))
    scheduler = keywords.get("scheduler")
    scheduler = sd.scheduler if scheduler is None else sd._get_scheduler(scheduler)
    scheduler.check_num_steps(num_steps)
    sides = [keywords.get(k) for k in ("width", "height")]
    width, height = (sd.img_width if sides[0] is None else sides[0]), sides[1]
    height = sd.img_height if height is None else height
    check_size("width", width, sd.size_multiple, sd.latent_factor)
    check_size("height", height, sd.size_multiple, sd.latent_factor)
    check_memory(sd, items * batch_size, height, width, guided=guidance > 1.0)
    if keywords.get("diffusion_noise") is not None:
        f = sd.latent_factor
        shape = (items * batch_size, height // f, width // f, sd.latent_channels)
        noise_like(shape, None, keywords["diffusion_noise"])
    return scheduler, width, height


def _itemsize(model) -> int:
    return np.dtype(keras.backend.standardize_dtype(model.compute_dtype)).itemsize


def estimate_bytes(sd, rows: int, height: int, width: int, guided: bool) -> int:
    """A rough lower bound of the memory a run of `rows` images needs beyond the weights:
    the UNet's skip activations (all alive at its bottom) and its largest attention
    logits (TensorFlow materialises them), the VAE decoder's attention logits and its
    two widest activations, and the images."""
    unet, decoder = sd.diffusion_model, sd.decoder
    h, w = height // sd.latent_factor, width // sd.latent_factor
    levels = tuple(unet.block_out_channels)
    cells = [(h >> i) * (w >> i) for i in range(len(levels))]
    skips = sum(c * n for c, n in zip(levels, cells, strict=True))
    skips *= getattr(unet, "layers_per_block", 1) + 1
    heads = getattr(unet, "num_heads", (1,) * len(levels))
    attends = getattr(unet, "attention_levels", (False,) * len(levels))
    logits = [n * n * k for n, k, on in zip(cells, heads, attends, strict=True) if on]
    logits.append(cells[-1] ** 2 * heads[-1])  # the mid block always attends
    if keras.backend.backend() != "tensorflow":  # fused kernels never hold them all
        logits = [0]
    unet_bytes = (2 * rows if guided else rows) * (skips + max(logits)) * _itemsize(unet)
    widest = 2 * height * width * decoder.block_out_channels[0] + (h * w) ** 2
    return unet_bytes + rows * (widest * _itemsize(decoder) + height * width * 3 * 5)


def memory_limit() -> int | None:
    """The memory this process may use, in bytes: the machine's physical memory, or a
    container's (cgroup v2) limit if lower; None where the OS does not say."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limits.append(int(f.read().strip()))
    except (OSError, ValueError):  # absent, or "max"
        pass
    return min(limits, default=None)


def check_memory(sd, rows: int, height: int, width: int, guided: bool) -> None:
    """Refuse a run whose estimated memory exceeds the machine's physical memory."""
    need, limit = estimate_bytes(sd, rows, height, width, guided), memory_limit()
    if limit is not None and need > limit:
        raise ValueError(
            f"{rows} image(s) of {height}x{width} need at least {_amount(need)} of memory "
            f"for activations (an estimate; weights not counted), more than this machine's "
            f"{_amount(limit)}: lower batch_size or the image size."
        )


def _amount(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def float_array(value, name: str) -> np.ndarray:
    """`value` (array, tensor, nested lists) as a finite float numpy array."""
    try:
        array = np.asarray(ops.convert_to_numpy(value) if ops.is_tensor(value) else value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be a float array; received {type(value).__name__} ({error})."
        ) from None
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a float array; received dtype {array.dtype}.")
    if not np.isfinite(array.astype(np.float32)).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    return array


def text_context(encoded_text, rows: int, sd, guided: bool):
    """`encoded_text` checked (finite, [1 or rows, L, the UNet's context width]; with
    guidance L must be the tokenizer's length, as the negative prompt's embeddings) and
    repeated to `rows`."""
    array = float_array(encoded_text, "encoded_text")
    shape, width = array.shape, getattr(sd.diffusion_model, "cross_attention_dim", None)
    if array.ndim not in (2, 3) or (width is not None and shape[-1] != width) or not shape[-2]:
        raise ValueError(
            f"encoded_text must be [batch, tokens, {width}] (the UNet's "
            f"cross_attention_dim) as encode_text returns; received shape {shape}."
        )
    length = sd.tokenizer.max_length if guided else shape[-2]
    if shape[-2] != length:
        raise ValueError(
            f"encoded_text has {shape[-2]} tokens but the negative prompt's embeddings have "
            f"{length}; with guidance they must match (encode_text gives {length})."
        )
    return expand_batch(ops.convert_to_tensor(array), rows, "encoded_text")


def check_finite(values: np.ndarray, what: str, model) -> np.ndarray:
    """`values` (a run's output) unless any is NaN or infinite: the image would be black
    or grey garbage, so the run fails naming the likely causes."""
    finite = np.isfinite(values)
    if finite.all():
        return values
    cause = "bad inputs or weights (NaN/inf in a checkpoint, an image or embeddings)"
    if keras.backend.standardize_dtype(model.compute_dtype) == "float16":
        cause = "float16 overflow (use mixed_bfloat16 or float32), or " + cause
    raise FloatingPointError(
        f"the {what} hold {int(finite.size - finite.sum())} NaN/inf values, so no image was "
        f"made. Likely cause: {cause}."
    )


def expand_batch(tensor, batch_size: int, name: str, rank: int = 3):
    """Repeat a single item ([1, ...] or unbatched) to `batch_size` items."""
    tensor = ops.convert_to_tensor(tensor)
    if len(tensor.shape) == rank - 1:
        tensor = ops.expand_dims(tensor, 0)
    if len(tensor.shape) != rank:
        raise ValueError(
            f"{name} must have rank {rank} or {rank - 1}; received shape {tuple(tensor.shape)}."
        )
    if tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] == 1:
        return ops.repeat(tensor, batch_size, axis=0)
    raise ValueError(
        f"{name} has batch {tensor.shape[0]} but batch_size is {batch_size}; "
        "give one item or batch_size items."
    )


def check_extend(extend, size: tuple[int, int]) -> None:
    """Refuse an outpainting border that makes a side longer than `MAX_SIDE` before the
    canvas is allocated (its other checks are `keras_sd.images.extend_canvas`'s)."""
    sides = (extend,) * 4 if isinstance(extend, numbers.Integral) else extend
    if not isinstance(sides, (list, tuple)) or len(sides) != 4:
        return
    if not all(isinstance(v, numbers.Integral) for v in sides):
        return
    top, right, bottom, left = sides
    height, width = size[0] + top + bottom, size[1] + left + right
    if max(height, width) > MAX_SIDE:
        raise ValueError(
            f"extend={extend!r} would make a {height}x{width} image; sides are limited to "
            f"{MAX_SIDE} pixels."
        )


def check_strength(strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a number in [0, 1]; received {strength!r}.")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1]; received {strength!r}.")


def noise_like(shape, seed, diffusion_noise) -> np.ndarray:
    """Standard normal float32 noise of `shape`: drawn from `seed` (numpy, the same on
    every backend) or the caller's `diffusion_noise` ([B, ...] or one item)."""
    if diffusion_noise is None:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    noise = float_array(diffusion_noise, "diffusion_noise")
    noise = expand_batch(noise, shape[0], "diffusion_noise", rank=len(shape))
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(
            f"diffusion_noise must have shape {tuple(shape)} for this size and batch; "
            f"received {tuple(noise.shape)}."
        )
    return np.asarray(ops.convert_to_numpy(ops.cast(noise, "float32")))


def prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings; received {prompt!r}.")


def negative_list(negative_prompt, count: int) -> list[str]:
    if negative_prompt is None:
        return [""]
    negatives = prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) not in (1, count):
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries but prompt has {count}; "
            "give one negative prompt, or one per prompt."
        )
    return negatives


def item_count(counts: dict) -> int:
    """How many outputs (before `batch_size`) arguments of these batch sizes make: one of
    each serves all, the others must agree."""
    items = max(counts.values())
    if any(count not in (1, items) for count in counts.values()):
        given = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise ValueError(
            f"prompt, image and mask counts must be 1 or one number ({given}): a list of "
            "prompts pairs with a batch of images of the same length."
        )
    return items


def rows(count: int, items: int, batch_size: int) -> np.ndarray:
    """For each of `items * batch_size` rows, which of `count` entries (1 or `items`) it
    takes: item i's `batch_size` images are consecutive, as diffusers orders them."""
    return np.repeat(np.arange(items) if count > 1 else np.zeros(items, int), batch_size)
