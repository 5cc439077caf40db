"""Argument checks and batch bookkeeping shared by the pipeline's methods."""

from __future__ import annotations

import numbers

import numpy as np
from keras import ops


def validate_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; received {value!r}.")


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


def check_sampling_args(batch_size, num_steps, guidance, seed, diffusion_noise) -> None:
    validate_positive_int("batch_size", batch_size)
    validate_positive_int("num_steps", num_steps)
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"unconditional_guidance_scale must be a number; received {guidance!r}.")
    if diffusion_noise is not None and seed is not None:
        raise ValueError("Pass either diffusion_noise or seed, not both.")


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
    noise = expand_batch(diffusion_noise, shape[0], "diffusion_noise", rank=len(shape))
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
