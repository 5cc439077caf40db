"""Checkpoint conversion between layouts (the `keras-sd convert` command)."""

from __future__ import annotations

from keras_sd.pipeline import StableDiffusion
from keras_sd.weights.checkpoint import LAYOUTS


def convert(src, dst, layout: str | None = None, dtype: str | None = None, **kwargs) -> None:
    """Convert a checkpoint between layouts.

    The output is written under a temporary sibling name and renamed into place when
    complete, folders included, so an interrupted conversion leaves `dst` as it was
    (see `keras_sd.weights.atomic` for what a killed process leaves behind).

    Args:
        src: anything `StableDiffusion.from_checkpoint` reads.
        dst: the output; a `.safetensors` path means the "compvis" layout, anything
            else a diffusers folder, unless `layout` says otherwise.
        layout: "compvis", "diffusers" or "keras"; default from `dst`.
        dtype: None keeps float32; "float16" halves the size.
        **kwargs: passed to `from_checkpoint` (config, prediction_type, use_ema, ...).

    Example:
    >>> convert("v1-5-pruned-emaonly.ckpt", "v1-5.safetensors")  # doctest: +SKIP
    >>> convert("v1-5.safetensors", "sd15-diffusers", dtype="float16")  # doctest: +SKIP
    """
    if layout is None:
        layout = "compvis" if str(dst).lower().endswith(".safetensors") else "diffusers"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; received {layout!r}.")
    sd = StableDiffusion.from_checkpoint(src, jit_compile=False, **kwargs)
    sd.save_checkpoint(dst, layout, dtype)
