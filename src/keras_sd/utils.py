"""Saving and showing generated images: PIL conversion, grids, atomic PNG writes.

numpy and Pillow only, so the `keras-sd` command can use it before Keras is imported.
"""

from __future__ import annotations

import math
import os
import secrets

import numpy as np
from PIL import Image


def _check_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] not in (1, 3, 4):
        raise TypeError(
            "images must be uint8 [H, W, C] or [B, H, W, C] with C in (1, 3, 4), as the "
            f"pipeline returns; received dtype {images.dtype} and shape {images.shape}."
        )
    return images


def to_pil(images):
    """PIL images from uint8 arrays: one `Image` for `[H, W, 3]`, a list for `[B, H, W, 3]`.

    Example:
    >>> to_pil(np.zeros((4, 6, 3), np.uint8)).size
    (6, 4)
    >>> len(to_pil(np.zeros((2, 4, 6, 3), np.uint8)))
    2
    """
    images = _check_uint8(images)
    if images.ndim == 3:
        return Image.fromarray(np.squeeze(images, -1) if images.shape[-1] == 1 else images)
    return [to_pil(image) for image in images]


def image_grid(images: np.ndarray) -> np.ndarray:
    """Tile a batch [B, H, W, C] into one image, as square as possible.

    Example:
    >>> image_grid(np.zeros((3, 4, 5, 3), np.uint8)).shape
    (8, 10, 3)
    """
    count, height, width, channels = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = np.zeros((rows * height, cols * width, channels), images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    return grid


def save_image(image: np.ndarray, path) -> None:
    """Write one image atomically: a failed write never leaves a half-written file at
    `path`. The file gets the permissions of any new file (the umask's;
    `tempfile.mkstemp` would make it readable by its owner only)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{os.path.splitext(name)[1]}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_images(images, path) -> str:
    """Save pipeline output as one image file: the image itself, or a grid for a batch.

    Args:
        images: uint8 `[H, W, 3]` or `[B, H, W, 3]` (a batch of one is saved as is).
        path: where to write; the format follows the extension (.png, .jpg, .webp).

    Returns:
        `path`, as a string.

    Example:
    >>> import tempfile
    >>> path = save_images(np.zeros((4, 8, 8, 3), np.uint8), tempfile.mktemp(suffix=".png"))
    >>> Image.open(path).size
    (16, 16)
    """
    images = _check_uint8(images)
    if images.ndim == 4:
        images = images[0] if len(images) == 1 else image_grid(images)
    save_image(np.squeeze(images, -1) if images.shape[-1] == 1 else images, path)
    return os.fspath(path)
