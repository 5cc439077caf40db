"""Image and mask inputs of the image workflows: reading, checking, canvas and paste-back.

Everything here is numpy and Pillow, no model math: `StableDiffusion.image_to_image`,
`inpaint` and `outpaint` call these at their boundary, so every input form (uint8 or
float arrays, PIL images, paths, lists of them) becomes one float32 array with a
checked size before a model sees it, and a bad input fails with an error that names
the argument.

Conventions: images are channels-last RGB, `[B, H, W, 3]` float32 in [0, 1]; masks are
`[B, H, W, 1]` float32 in [0, 1] with 1 (white, True) where the image is repainted, as
in diffusers.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
from PIL import Image

VALUE_RANGES = ((0, 1), (-1, 1), (0, 255))


def _open(item, name: str) -> Image.Image:
    try:
        with Image.open(os.fspath(item)) as image:
            image.load()
            return image
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{name}: cannot read an image from {os.fspath(item)!r} ({error})."
        ) from None


def _is_pil_or_path(item) -> bool:
    return isinstance(item, (Image.Image, str, os.PathLike))


def _is_list_of_pil_or_paths(items) -> bool:
    return isinstance(items, (list, tuple)) and bool(items) and all(map(_is_pil_or_path, items))


def _read_files(items, mode: str, name: str) -> np.ndarray:
    """uint8 arrays of PIL images or image files converted to `mode`: [H, W, ...] for
    one, [B, H, W, ...] for a list (of one size)."""
    one = _is_pil_or_path(items)
    arrays = []
    for item in [items] if one else items:
        image = item if isinstance(item, Image.Image) else _open(item, name)
        arrays.append(np.asarray(image.convert(mode)))
    if one:
        return arrays[0]
    shapes = sorted({a.shape[:2] for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"{name}: the images of a list must have one size; received {shapes}.")
    return np.stack(arrays)


def _nearest_multiple(value: int, factor: int) -> int:
    return max(factor, int(round(value / factor)) * factor)


def _resize(array: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """Resize [B, H, W, C] float32 per channel ('F' mode keeps the float values)."""
    out = np.empty((array.shape[0], height, width, array.shape[-1]), np.float32)
    for b, image in enumerate(array):
        for c in range(array.shape[-1]):
            plane = Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
            out[b, ..., c] = np.asarray(plane.resize((width, height), resample))
    return out


def fit_to_factor(array: np.ndarray, factor: int, resize: bool = False, name="image"):
    """Check that `[B, H, W, C]` has H and W multiples of `factor`, or resize it to the
    nearest such size (bicubic for images, bilinear for masks) when `resize` is True.

    Raises:
        ValueError: naming `name`, the size and the nearest valid size.

    Example:
    >>> fit_to_factor(np.zeros((1, 12, 16, 3), np.float32), 8, resize=True).shape
    (1, 16, 16, 3)
    """
    height, width = array.shape[1:3]
    valid = _nearest_multiple(height, factor), _nearest_multiple(width, factor)
    if (height, width) == valid:
        return array
    if not resize:
        raise ValueError(
            f"{name} size {height}x{width} (height x width) is not a multiple of {factor}, "
            f"the model's size multiple; the nearest valid size is {valid[0]}x{valid[1]}. "
            "Resize it, or pass resize=True."
        )
    resample = Image.Resampling.BILINEAR if array.shape[-1] == 1 else Image.Resampling.BICUBIC
    return np.clip(_resize(array, *valid, resample), 0.0, 1.0)


def load_images(image, factor: int, *, value_range=None, resize: bool = False, name="image"):
    """`read_images` then `fit_to_factor`: float32 RGB `[B, H, W, 3]` in [0, 1] with H and
    W multiples of `factor`.

    Example:
    >>> load_images(np.full((8, 16, 3), 255, np.uint8), factor=8).shape
    (1, 8, 16, 3)
    """
    return fit_to_factor(
        read_images(image, value_range=value_range, name=name), factor, resize, name
    )


def read_images(image, *, value_range=None, name: str = "image") -> np.ndarray:
    """Turn any supported image input into float32 RGB `[B, H, W, 3]` in [0, 1].

    Args:
        image: a uint8 array `[H, W, 3]` or `[B, H, W, 3]` (greyscale `[H, W]`,
            `[H, W, 1]` or `[B, H, W, 1]` is repeated to RGB); a float array, with
            `value_range` stated; a PIL image or an image file path (RGBA, greyscale
            and palette images are converted to RGB as Pillow's `convert("RGB")` does:
            the alpha channel is dropped); or a list of PIL images or paths of one size.
        value_range: for float arrays, the range the values are in: (0, 1), (-1, 1) or
            (0, 255). Integer arrays are read as 0-255.
        name: the argument name used in error messages.

    Returns:
        float32 array `[B, H, W, 3]` in [0, 1].

    Raises:
        ValueError: naming `name`, for a 4-channel (RGBA or latent) array, an unreadable
            path or values outside the stated range.
        TypeError: for an input of another type, or a float array without `value_range`.

    Example:
    >>> read_images(np.zeros((5, 7), np.uint8)).shape
    (1, 5, 7, 3)
    >>> read_images(np.zeros((8, 8, 3), np.float32), value_range=(-1, 1)).max().item()
    0.5
    """
    if _is_pil_or_path(image) or _is_list_of_pil_or_paths(image):
        if value_range is not None:
            raise ValueError("value_range applies to arrays only, not to a PIL image or path.")
        image = _read_files(image, "RGB", name)
    if isinstance(image, (bool, numbers.Number, str, bytes)) or image is None:
        raise TypeError(
            f"{name} must be an array, a PIL image, a path or a list of PIL images or paths; "
            f"received {type(image).__name__}."
        )
    try:
        array = np.asarray(image)
    except Exception as error:  # objects numpy cannot read: name the argument
        raise TypeError(
            f"{name}: cannot read {type(image).__name__} as an array ({error})."
        ) from None
    if array.dtype == object or array.dtype.kind not in "uif":
        raise TypeError(f"{name} must hold numbers; received an array of dtype {array.dtype}.")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        channels = array.shape[-1] if array.ndim == 4 else None
        hint = " (RGBA or latents?); pass RGB, or a PIL image to convert" if channels == 4 else ""
        raise ValueError(
            f"{name} must be channels-last RGB [H, W, 3] or [B, H, W, 3] (or greyscale [H, W], "
            f"[..., 1]); received shape {tuple(np.shape(image))}{hint}."
        )
    array = _to_unit_range(array, value_range, name)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _to_unit_range(array: np.ndarray, value_range, name: str) -> np.ndarray:
    if value_range is None:
        if array.dtype.kind == "f":
            raise TypeError(
                f"{name} is a float array: pass value_range=(0, 1), (-1, 1) or (0, 255) to say "
                "which range its values are in (uint8 arrays need none)."
            )
        value_range = (0, 255)
    try:
        value_range = tuple(value_range)
    except TypeError:
        value_range = (value_range,)
    if value_range not in VALUE_RANGES:
        raise ValueError(
            f"value_range must be one of {list(VALUE_RANGES)}; received {value_range!r}."
        )
    if array.dtype.kind in "ui" and value_range != (0, 255):
        raise ValueError(
            f"an integer {name} array is read as 0-255; received value_range={value_range}."
        )
    low, high = value_range
    array = array.astype(np.float32)
    found = float(array.min()), float(array.max())
    tolerance = 1e-3 * (high - low)  # rounding of float images written elsewhere
    if not np.isfinite(found).all() or found[0] < low - tolerance or found[1] > high + tolerance:
        raise ValueError(
            f"{name} values must be in [{low}, {high}] (value_range); received values in "
            f"[{found[0]:g}, {found[1]:g}]."
        )
    return np.clip((array - low) / (high - low), 0.0, 1.0)


def read_masks(mask, size: tuple[int, int], *, name: str = "mask") -> np.ndarray:
    """Turn any supported mask input into float32 `[B, H, W, 1]` in [0, 1] (1: repaint).

    Args:
        mask: a float or integer array in [0, 1], a bool array (True: repaint) or a uint8
            array (255: repaint), shaped `[H, W]`, `[H, W, 1]`, `[B, H, W]` or
            `[B, H, W, 1]`; a PIL image or a path (converted to greyscale "L", white:
            repaint); or a list of PIL images or paths of one size. Soft values blend.
        size: `(height, width)` the masks must have: the image's (as read, before
            any `fit_to_factor`).
        name: the argument name used in error messages.

    Returns:
        float32 array `[B, H, W, 1]` in [0, 1].

    Example:
    >>> read_masks(np.array([[0, 255], [255, 0]], np.uint8), (2, 2))[0, ..., 0].tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    if _is_pil_or_path(mask) or _is_list_of_pil_or_paths(mask):
        mask = _read_files(mask, "L", name)
    if isinstance(mask, (numbers.Number, str, bytes)) or mask is None:
        raise TypeError(
            f"{name} must be an array, a PIL image, a path or a list of PIL images or paths; "
            f"received {type(mask).__name__}."
        )
    array = np.asarray(mask)
    if array.dtype == object or array.dtype.kind not in "buif":
        raise TypeError(f"{name} must hold numbers or booleans; received dtype {array.dtype}.")
    # [H, W, 3] would read as a batch of H masks 3 pixels wide: an RGB mask, refused.
    if array.ndim == 4 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        if array.shape[-1] != 1:
            raise ValueError(
                f"{name} must have one channel (greyscale); received shape {array.shape}. "
                "Pass a PIL image or a path to convert an RGB mask."
            )
        array = array[..., 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(
            f"{name} must be [H, W], [H, W, 1], [B, H, W] or [B, H, W, 1]; "
            f"received shape {np.shape(mask)}."
        )
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"{name} values must be in [0, 1] (or bool, or uint8 0-255); received values in "
            f"[{array.min():g}, {array.max():g}]."
        )
    found = tuple(array.shape[1:3])
    if found != tuple(size):
        raise ValueError(
            f"{name} size {found[0]}x{found[1]} does not match the image's "
            f"{size[0]}x{size[1]} (height x width)."
        )
    return array[..., None]


def latent_mask(masks: np.ndarray, factor: int) -> np.ndarray:
    """Masks `[B, H, W, 1]` at latent resolution `[B, H/f, W/f, 1]`: each latent cell takes
    the largest value of the pixels it covers, so the repainted latent region covers
    every repainted pixel. (diffusers takes each cell's top-left pixel; the two agree on
    masks that are constant over cells.)

    Example:
    >>> m = np.zeros((1, 4, 4, 1), np.float32); m[0, 3, 0] = 0.5
    >>> latent_mask(m, 2)[0, ..., 0].tolist()
    [[0.0, 0.0], [0.5, 0.0]]
    """
    b, height, width, _ = masks.shape
    cells = masks.reshape(b, height // factor, factor, width // factor, factor, 1)
    return cells.max(axis=(2, 4))


def feather(masks: np.ndarray, width: int) -> np.ndarray:
    """Paste-back weights: the masks ramped down over `width` pixels at their inner edge.

    A pixel at chessboard distance d (1 for a neighbour of an unmasked pixel) from the
    unmasked region gets `mask * min(1, d / (width + 1))`, so every pixel outside the
    mask keeps weight 0 and the seam is softened inside the mask only.

    Example:
    >>> m = np.zeros((1, 1, 6, 1), np.float32); m[0, 0, 2:] = 1
    >>> [round(float(w), 2) for w in feather(m, 2)[0, 0, :, 0]]
    [0.0, 0.0, 0.33, 0.67, 1.0, 1.0]
    """
    inside = masks[..., 0] > 0  # [B, H, W]
    distance = np.zeros(inside.shape, np.float32)
    for _ in range(width):
        distance += inside
        padded = np.pad(inside, ((0, 0), (1, 1), (1, 1)), mode="edge")
        # A pixel stays inside while its 3x3 neighbourhood does (erosion; the image border
        # counts as inside, so only unmasked pixels start a ramp).
        inside = np.logical_and.reduce(
            [
                padded[:, 1 + dy : padded.shape[1] - 1 + dy, 1 + dx : padded.shape[2] - 1 + dx]
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
            ]
        )
    distance += inside
    return masks * np.minimum(1.0, distance / (width + 1))[..., None]


def paste_back(generated: np.ndarray, original: np.ndarray, masks: np.ndarray, width: int):
    """Keep `original` outside the masks exactly, `generated` inside, feathered at the edge.

    Args:
        generated: uint8 `[B, H, W, 3]`.
        original: float32 `[B, H, W, 3]` in [0, 1] (`read_images` output).
        masks: float32 `[B, H, W, 1]` in [0, 1].
        width: feather width in pixels, inside the mask.

    Returns:
        uint8 `[B, H, W, 3]`.

    Example:
    >>> m = np.zeros((1, 1, 2, 1), np.float32); m[0, 0, 1] = 1
    >>> paste_back(np.full((1, 1, 2, 3), 9, np.uint8), np.zeros((1, 1, 2, 3)), m, 0)[0, 0, :, 0]
    array([0, 9], dtype=uint8)
    """
    weight = feather(masks, width)
    mixed = weight * generated.astype(np.float32) + (1.0 - weight) * np.round(original * 255.0)
    return np.round(mixed).astype(np.uint8)


def extend_canvas(images: np.ndarray, extend, factor: int):
    """Grow images by `extend` pixels per side, filling the border from the edge pixels.

    Args:
        images: float32 `[B, H, W, 3]`.
        extend: `(top, right, bottom, left)` pixels, or one int for all four sides;
            each is rounded up to a multiple of `factor` so the canvas stays valid.
        factor: the model's `size_multiple`.

    Returns:
        `(canvas [B, H', W', 3], masks [B, H', W', 1] with 1 on the new border,
        (top, right, bottom, left) as used)`.

    Example:
    >>> canvas, mask, used = extend_canvas(np.ones((1, 8, 8, 3)), (0, 5, 0, 0), 8)
    >>> canvas.shape, used, mask[0, 0, :, 0].tolist()[6:10]
    ((1, 8, 16, 3), (0, 8, 0, 0), [0.0, 0.0, 1.0, 1.0])
    """
    if isinstance(extend, numbers.Integral) and not isinstance(extend, bool):
        extend = (extend,) * 4
    sides = tuple(extend) if isinstance(extend, (list, tuple)) else ()
    if len(sides) != 4 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in sides
    ):
        raise ValueError(
            "extend must be (top, right, bottom, left): four non-negative ints; "
            f"received {extend!r}."
        )
    if not any(sides):
        raise ValueError("extend must grow at least one side; received (0, 0, 0, 0).")
    top, right, bottom, left = (-(-int(v) // factor) * factor for v in sides)
    pad = ((0, 0), (top, bottom), (left, right), (0, 0))
    # Edge colours rather than black: the start of the border's latents (strength < 1)
    # and the colour the known region's surroundings suggest.
    canvas = np.pad(images, pad, mode="edge")
    masks = np.pad(np.zeros(images.shape[:3] + (1,), np.float32), pad, constant_values=1.0)
    return canvas, masks, (top, right, bottom, left)
