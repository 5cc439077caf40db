"""Image/caption pairs for textual inversion: a few images of a thing, captions from templates.

Pure numpy and Pillow behind a `keras.utils.PyDataset`, so `fit()` takes it on TensorFlow,
JAX and PyTorch alike. Each image is resized (shorter side to `size`) and cropped square
(centre, or a random window), randomly flipped, and captioned with a random template
around the placeholder token, as in the textual-inversion paper's training set-up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import keras
import numpy as np
from PIL import Image

# Varied captions around the token, so that the embedding learns the thing, not a phrase.
DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a picture of the {}",
    "an image of a {}",
    "a close-up of the {}",
    "a cropped photo of a {}",
    "a bright photo of the {}",
    "a dark photo of a {}",
    "a small {}",
    "a large {}",
    "one {}",
    "the {}",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CROPS = ("center", "random")


def _read(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"images_or_folder: cannot read image {str(path)!r} ({error}).") from None


def load_images(images_or_folder) -> list[Image.Image]:
    """The RGB images of a folder (every file with an image extension, in name order), a
    list of paths or PIL images, or uint8 arrays [N, H, W, 3] / a list of [H, W, 3].

    Example:
    >>> import numpy as np
    >>> [image.size for image in load_images(np.zeros((2, 8, 6, 3), "uint8"))]
    [(6, 8), (6, 8)]
    """
    items = images_or_folder
    if isinstance(items, (str, os.PathLike)):
        folder = Path(items)
        if not folder.is_dir():
            raise ValueError(f"images_or_folder={str(folder)!r} is not a folder.")
        items = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not items:
            raise ValueError(
                f"images_or_folder={str(folder)!r} holds no images (files ending in "
                f"{', '.join(IMAGE_SUFFIXES)})."
            )
    if isinstance(items, np.ndarray) and items.ndim == 3:
        items = [items]
    if len(items) == 0:
        raise ValueError("images_or_folder is empty; give 3-5 images of the concept.")
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
        elif isinstance(item, (str, os.PathLike)):
            out.append(_read(Path(item)))
        else:
            array = np.asarray(item)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(
                    "images_or_folder arrays must be uint8 [H, W, 3]; received "
                    f"{array.dtype} {array.shape}."
                )
            out.append(Image.fromarray(array))
    return out


def _square(image: Image.Image, size: int, crop: str, rng) -> np.ndarray:
    """Shorter side resized to `size`, then a size x size window: float32 in [-1, 1]."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    if crop == "center":
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    window = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
    return window / 127.5 - 1.0


class TextualInversionDataset(keras.utils.PyDataset):
    """Batches `{"images": float32 [B, size, size, 3] in [-1, 1], "token_ids": int32 [B, L]}`.

    Built by `textual_inversion_dataset`; see there for the arguments. Each epoch draws
    new crops, flips and templates from `seed` and the epoch number.

    Example:
    >>> import numpy as np
    >>> from keras_sd import CLIPTokenizer
    >>> tokenizer = CLIPTokenizer()
    >>> _ = tokenizer.add_tokens("<toy>")
    >>> data = textual_inversion_dataset(np.zeros((2, 16, 16, 3), "uint8"), "<toy>",
    ...                                  tokenizer, size=8, repeats=3, batch_size=4)
    >>> isinstance(data, TextualInversionDataset), len(data), data[0]["images"].shape
    (True, 2, (4, 8, 8, 3))
    """

    def __init__(
        self, images, token, tokenizer, templates, size, repeats, flip, crop, batch_size, seed
    ):
        super().__init__()
        self.images, self.token, self.tokenizer = images, token, tokenizer
        self.templates, self.size, self.flip, self.crop = tuple(templates), size, flip, crop
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.length = len(images) * repeats

    def __len__(self) -> int:
        return math.ceil(self.length / self.batch_size)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        items = range(index * self.batch_size, min(self.length, (index + 1) * self.batch_size))
        pixels, captions = [], []
        for item in items:
            image = _square(self.images[item % len(self.images)], self.size, self.crop, rng)
            if self.flip and rng.random() < 0.5:
                image = image[:, ::-1]
            pixels.append(image)
            captions.append(self.templates[rng.integers(len(self.templates))].format(self.token))
        return {"images": np.stack(pixels), "token_ids": self.tokenizer(captions)}

    def on_epoch_end(self) -> None:
        self.epoch += 1


def textual_inversion_dataset(
    images_or_folder,
    token: str,
    tokenizer,
    templates=DEFAULT_TEMPLATES,
    size: int = 512,
    repeats: int = 100,
    flip: bool = True,
    crop: str = "center",
    batch_size: int = 1,
    seed: int = 0,
) -> TextualInversionDataset:
    """Training pairs for `TextualInversionTrainer.fit`, on every backend.

    Args:
        images_or_folder: a folder of images, a list of image paths or PIL images, or uint8
            arrays ([N, H, W, 3] or a list of [H, W, 3]); images of mixed sizes are resized.
        token: the placeholder the captions contain (one word, no whitespace).
        tokenizer: the pipeline's tokenizer, which already holds `token` (`sd.tokenizer`
            once the trainer or `sd.add_tokens` added it).
        templates: caption templates with one "{}" for the token.
        size: side of the square training images (the model's training size).
        repeats: how many times each image appears per epoch.
        flip: random horizontal flips.
        crop: "center" or "random" square window after resizing.
        batch_size: pairs per batch.
        seed: seed of the crops, flips and templates.

    Returns:
        A `keras.utils.PyDataset` of `{"images", "token_ids"}` batches.

    Example:
    >>> data = textual_inversion_dataset("my-toy/", "<toy>", sd.tokenizer)  # doctest: +SKIP
    >>> trainer.fit(data, epochs=1)  # doctest: +SKIP
    """
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise ValueError(f"token must be one word without whitespace; received {token!r}.")
    if token not in tokenizer.added_tokens:
        raise ValueError(
            f"token={token!r} is not in the tokenizer; add it first (TextualInversionTrainer "
            "or StableDiffusion.add_tokens does)."
        )
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ValueError(f"templates must be strings with one '{{}}' each; received {templates!r}.")
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r} is not supported; use one of {CROPS}.")
    for name, value in (("size", size), ("repeats", repeats), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; received {value!r}.")
    images = load_images(images_or_folder)
    return TextualInversionDataset(
        images, token, tokenizer, templates, size, repeats, bool(flip), crop, batch_size, seed
    )


__all__ = [
    "DEFAULT_TEMPLATES",
    "TextualInversionDataset",
    "load_images",
    "textual_inversion_dataset",
]
