"""Deterministic prompt-adherence checker for the shapes data set: no learned model.

Reading an image takes four steps:

1. background: the median colour of the outer ring of pixels (the generator keeps shapes
   away from the border), snapped to the nearest `COLORS` entry;
2. foreground: the median colour of pixels far from the background;
3. mask: each pixel's position on the segment from the background to the foreground colour
   gives a soft coverage in [0, 1] (so blur and anti-aliasing keep sub-pixel edges); the
   largest connected region covered over half is the shape, and its median colour, snapped
   to the nearest `COLORS` entry, is the shape's colour;
4. shape: the radial profile r(theta) of the mask seen from its centroid. Its Fourier
   harmonics 3, 4 and 5 give the symmetry (triangle 3; square and cross 4; star 5), a circle
   has none, and the cross's deep notches make its 4th harmonic far larger than a square's.

Blur, noise, colour shifts and JPEG artefacts of the size a small diffusion model makes leave
all four steps unchanged at 64 px; at 32 px a Gaussian blur of radius 1.5 or more starts to
turn stars into circles. tests/shapes/test_checker.py measures the accuracy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_sd.shapes.dataset import COLORS, parse_caption

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], np.float32)  # [6, 3]
_BORDER = 2  # width of the ring read as background, in pixels
_FAR = 60.0  # RGB distance from the background beyond which a pixel is surely foreground
_MIN_AREA = 0.005  # smallest shape, as a fraction of the image, below which nothing is drawn
_ANGLES = 90  # rays of the radial profile
_RAY_STEP = 0.25  # pixels between samples along a ray
# Thresholds on the harmonics relative to the mean radius, set between the ranges that
# blurred, noisy, JPEG-compressed 32-64 px renders give: circles <= 0.016 (pixel grid),
# squares 0.05-0.07, triangles and stars >= 0.07, crosses >= 0.12.
_ROUND = 0.03  # below this for k = 3, 4, 5: no symmetry, a circle
_NOTCHED = 0.09  # a 4-fold shape above this has notches: a cross, not a square
_MAX_SIDE = 128  # larger images are block-averaged down first: same reading, bounded cost


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What `check` read from an image and whether it matches the prompt.

    Attributes:
        background_ok, color_ok, shape_ok: whether each recovered part equals the prompt's.
        background, color, shape: the recovered names (None when no shape was found).

    Example:
        >>> from keras_sd.shapes.dataset import Combination, render
        >>> image = render(Combination("circle", "red", "blue"))
        >>> result = check(image, "a red circle on a blue background")
        >>> result.ok, result.color
        (True, 'red')
    """

    background_ok: bool
    color_ok: bool
    shape_ok: bool
    background: str
    color: str | None
    shape: str | None

    @property
    def ok(self) -> bool:
        """True when background, colour and shape all match the prompt."""
        return self.background_ok and self.color_ok and self.shape_ok


def _nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(np.sum((_PALETTE - rgb) ** 2, axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (label propagation, numpy only)."""
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)
    padded = np.zeros((height + 2, width + 2), labels.dtype)
    while True:
        padded[1:-1, 1:-1] = labels
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        spread = np.where(mask, np.maximum.reduce([labels, *neighbours]), 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return np.logical_or.reduce(
        [mask, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    )


def _radial_profile(coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(angles [A], r [A]): the covered length along rays from the coverage-weighted centroid."""
    height, width = coverage.shape
    rows, cols = np.mgrid[0:height, 0:width]
    total = coverage.sum()
    cy, cx = (coverage * rows).sum() / total, (coverage * cols).sum() / total
    reach = np.hypot(rows - cy, cols - cx)[coverage > 0].max() + 1.0
    angles = np.linspace(0.0, 2 * np.pi, _ANGLES, endpoint=False)
    steps = np.arange(_RAY_STEP / 2, reach, _RAY_STEP)
    y = cy - np.sin(angles)[:, None] * steps  # [A, S]
    x = cx + np.cos(angles)[:, None] * steps
    # Bilinear sampling on a zero-padded copy, so rays leaving the image read nothing.
    padded = np.pad(coverage, 1)
    y = np.clip(y + 1, 0, height)
    x = np.clip(x + 1, 0, width)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - y0, x - x0
    y1, x1 = np.minimum(y0 + 1, height + 1), np.minimum(x0 + 1, width + 1)
    values = (
        padded[y0, x0] * (1 - fy) * (1 - fx)
        + padded[y0, x1] * (1 - fy) * fx
        + padded[y1, x0] * fy * (1 - fx)
        + padded[y1, x1] * fy * fx
    )
    return angles, values.sum(axis=1) * _RAY_STEP


def _harmonics(coverage: np.ndarray) -> dict[int, float]:
    angles, radius = _radial_profile(coverage)
    return {
        k: float(np.abs(np.mean(radius * np.exp(-1j * k * angles))) / np.mean(radius))
        for k in (3, 4, 5)
    }


def _classify(harmonics: dict[int, float]) -> str:
    strongest = max(harmonics, key=harmonics.get)
    if harmonics[strongest] < _ROUND:
        return "circle"
    if strongest == 3:
        return "triangle"
    if strongest == 5:
        return "star"
    return "cross" if harmonics[4] > _NOTCHED else "square"


def _downscale(pixels: np.ndarray) -> np.ndarray:
    factor = -(-max(pixels.shape[:2]) // _MAX_SIDE)
    if factor == 1:
        return pixels
    height, width = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:height, :width].reshape(height // factor, factor, width // factor, factor, 3)
    return blocks.mean(axis=(1, 3))


@dataclasses.dataclass(frozen=True)
class Reading:
    """The background, colour and shape names read from an image (None: no shape found).

    Example:
        >>> Reading("blue", "red", "circle").shape
        'circle'
    """

    background: str
    color: str | None
    shape: str | None


def read(image) -> Reading:
    """Read the background colour, shape colour and shape of a shapes image.

    Args:
        image: RGB array [H, W, 3] with values in [0, 255] (uint8 or float), or a PIL image.

    Returns:
        A `Reading`; `color` and `shape` are None when nothing stands out from the background.

    Example:
        >>> from keras_sd.shapes.dataset import Combination, render
        >>> read(render(Combination("star", "yellow", "black")))
        Reading(background='black', color='yellow', shape='star')
    """
    pixels = np.asarray(image, np.float32)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or min(pixels.shape[:2]) <= 2 * _BORDER:
        raise ValueError(f"image must be an RGB array [H, W, 3], got shape {pixels.shape}")
    pixels = _downscale(pixels)
    height, width, _ = pixels.shape
    ring = np.concatenate(
        [
            pixels[:_BORDER].reshape(-1, 3),
            pixels[-_BORDER:].reshape(-1, 3),
            pixels[:, :_BORDER].reshape(-1, 3),
            pixels[:, -_BORDER:].reshape(-1, 3),
        ]
    )
    background = np.median(ring, axis=0)
    nothing = Reading(_nearest_color(background), None, None)
    far = np.linalg.norm(pixels - background, axis=-1) > _FAR
    min_area = _MIN_AREA * height * width
    if far.sum() < min_area:
        return nothing
    # Coverage: where each pixel sits between the background and the foreground colour.
    axis = np.median(pixels[far], axis=0) - background
    coverage = np.clip((pixels - background) @ axis / (axis @ axis), 0.0, 1.0)
    region = _largest_component(coverage > 0.5)
    if region.sum() < min_area:
        return nothing
    color = _nearest_color(np.median(pixels[region], axis=0))
    # Keep the soft edge just outside the region: it carries the sub-pixel boundary.
    shape = _classify(_harmonics(coverage * _dilate(region)))
    return Reading(nothing.background, color, shape)


def check(image, prompt: str) -> CheckResult:
    """Whether an image shows what a shapes prompt asks for.

    Args:
        image: RGB array [H, W, 3] with values in [0, 255], or a PIL image.
        prompt: a shapes caption such as 'a red circle on a blue background'.

    Returns:
        A `CheckResult`; `.ok` is True when background, colour and shape all match.

    Raises:
        ValueError: when the prompt is not a shapes caption or the image is not RGB.

    Example:
        >>> from keras_sd.shapes.dataset import Combination, render
        >>> image = render(Combination("circle", "red", "blue"))
        >>> check(image, "a red circle on a blue background").ok
        True
        >>> check(image, "a red square on a blue background").shape_ok
        False
    """
    wanted = parse_caption(prompt)
    seen = read(image)
    return CheckResult(
        background_ok=seen.background == wanted.background,
        color_ok=seen.color == wanted.color,
        shape_ok=seen.shape == wanted.shape,
        background=seen.background,
        color=seen.color,
        shape=seen.shape,
    )


def score(images, prompts: list[str]) -> float:
    """Prompt adherence: the fraction of images whose `check` against their prompt is ok.

    Args:
        images: RGB images [N, H, W, 3] (an array or a sequence of images), values in [0, 255].
        prompts: N shapes captions, one per image.

    Returns:
        A float in [0, 1].

    Example:
        >>> from keras_sd.shapes.dataset import make_dataset
        >>> images, captions = make_dataset(10, seed=0)
        >>> score(images, captions)
        1.0
    """
    prompts = list(prompts)
    if len(images) != len(prompts) or not prompts:
        raise ValueError(
            f"need as many prompts as images, at least one; got {len(images)} images "
            f"and {len(prompts)} prompts"
        )
    return sum(
        check(image, prompt).ok for image, prompt in zip(images, prompts, strict=True)
    ) / len(prompts)
