"""Procedural "shapes" data set: captioned images of one coloured shape on a plain background.

It trains and measures the bundled tiny-shapes model: every caption names a shape, its colour
and the background colour, and `keras_sd.shapes.checker` reads all three back from the pixels,
so prompt adherence is a number rather than an opinion. A fixed tenth of the combinations
(`HELD_OUT`) never appears in training, to measure compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Every pair of colours is at least ~175 apart in RGB (green/black is the closest), far more
# than the blur and noise of a small model's output, so the nearest entry is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 190, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

MIN_SIZE = 32  # below this the thinnest parts (cross arms, star points) blur away
_SUPERSAMPLE = 8  # polygons are drawn this many times larger, then box-filtered: anti-aliasing
_RADIUS = 0.28  # nominal circumradius of a shape, as a fraction of the image side
_SCALE_JITTER = (0.8, 1.2)  # range of the random factor on the radius
_ROTATION_JITTER = 15.0  # degrees either way; small, so a square never reads as a diamond
_MARGIN = 0.06  # fraction of the side kept free between the shape and the image border
_STAR_INNER = 0.45  # inner / outer radius of the five-pointed star
_CROSS_HALF_WIDTH = 0.3  # half the arm width of the cross, as a fraction of its circumradius
_CIRCLE_VERTICES = 128


@dataclasses.dataclass(frozen=True)
class Combination:
    """One shape/colour/background triple of the data set.

    Args:
        shape: one of `SHAPES`.
        color: the shape's colour, a key of `COLORS`.
        background: the background colour, a key of `COLORS`, different from `color`.

    Example:
        >>> Combination("circle", "red", "blue").caption
        'a red circle on a blue background'
    """

    shape: str
    color: str
    background: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape={self.shape!r} is not one of {SHAPES}")
        for field in ("color", "background"):
            value = getattr(self, field)
            if value not in COLORS:
                raise ValueError(f"{field}={value!r} is not one of {tuple(COLORS)}")
        if self.color == self.background:
            raise ValueError(f"color and background are both {self.color!r}; they must differ")

    @property
    def caption(self) -> str:
        """The training caption, e.g. 'a red circle on a blue background'."""
        return f"a {self.color} {self.shape} on a {self.background} background"


def all_combinations() -> list[Combination]:
    """Every valid combination (5 shapes x 6 colours x 5 other backgrounds = 150), in a fixed order.

    Returns:
        A list of `Combination`, ordered by shape, then colour, then background.

    Example:
        >>> len(all_combinations())
        150
    """
    return [
        Combination(shape, color, background)
        for shape in SHAPES
        for color in COLORS
        for background in COLORS
        if background != color
    ]


# Excluded from training; 15 of 150. Built by the rule i -> (SHAPES[i % 5], colour i % 6,
# background (i % 6 + 1 + i // 5) % 6) for i < 15, so each shape is held out three times, each
# (shape, colour) pair at most once, and every shape, colour and background, and every pair of
# them, still appears in training: a model must compose known parts to draw these.
HELD_OUT: tuple[Combination, ...] = (
    Combination("circle", "red", "green"),
    Combination("square", "green", "blue"),
    Combination("triangle", "blue", "yellow"),
    Combination("star", "yellow", "white"),
    Combination("cross", "white", "black"),
    Combination("circle", "black", "green"),
    Combination("square", "red", "blue"),
    Combination("triangle", "green", "yellow"),
    Combination("star", "blue", "white"),
    Combination("cross", "yellow", "black"),
    Combination("circle", "white", "green"),
    Combination("square", "black", "blue"),
    Combination("triangle", "red", "yellow"),
    Combination("star", "green", "white"),
    Combination("cross", "blue", "black"),
)


def train_combinations() -> list[Combination]:
    """All combinations except `HELD_OUT` (135), in the order of `all_combinations()`.

    Example:
        >>> Combination("circle", "red", "green") in train_combinations()
        False
    """
    held_out = set(HELD_OUT)
    return [c for c in all_combinations() if c not in held_out]


_CAPTION = re.compile(
    r"an?\s+(?P<color>\w+)\s+(?P<shape>\w+)\s+on\s+an?\s+(?P<background>\w+)\s+background\.?"
)


def parse_caption(text: str) -> Combination:
    """Read a caption of the form 'a red circle on a blue background' back into a Combination.

    Case, surrounding and repeated spaces, 'an' for 'a' and a final full stop are tolerated.

    Args:
        text: the caption or prompt.

    Returns:
        The `Combination` it names.

    Raises:
        ValueError: naming the text, when it is not a shapes caption.

    Example:
        >>> parse_caption("A red circle on a blue background.")
        Combination(shape='circle', color='red', background='blue')
    """
    match = _CAPTION.fullmatch(str(text).strip().lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a shapes caption; expected 'a <color> <shape> on a <color> "
            f"background' with shape in {SHAPES} and color in {tuple(COLORS)}"
        )
    try:
        return Combination(**match.groupdict())
    except ValueError as err:
        raise ValueError(f"{text!r} is not a shapes caption: {err}") from None


def _outline(shape: str) -> np.ndarray:
    """Polygon vertices [V, 2] (x right, y up) of a shape with circumradius 1, centred at 0."""
    if shape == "circle":
        angles = np.linspace(0.0, 2 * np.pi, _CIRCLE_VERTICES, endpoint=False)
        radii = np.ones_like(angles)
    elif shape == "square":
        angles = np.deg2rad(45.0 + 90.0 * np.arange(4))
        radii = np.ones(4)
    elif shape == "triangle":
        angles = np.deg2rad(90.0 + 120.0 * np.arange(3))  # pointing up
        radii = np.ones(3)
    elif shape == "star":
        angles = np.deg2rad(90.0 + 36.0 * np.arange(10))  # a point straight up
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER)
    else:  # cross: a plus sign whose 8 outer corners lie on the unit circle
        half = _CROSS_HALF_WIDTH
        reach = np.sqrt(1.0 - half**2)
        arm = np.array([[reach, -half], [reach, half], [half, half]])
        quarter = np.array([[0.0, -1.0], [1.0, 0.0]])  # rotates a point by +90 degrees
        return np.concatenate([arm @ np.linalg.matrix_power(quarter, k).T for k in range(4)])
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _check_size(size) -> int:
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size={size!r} must be an integer >= {MIN_SIZE}")
    return int(size)


def render(
    combination: Combination, size: int = 64, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw one anti-aliased image of a combination.

    Without `rng` the shape is centred, upright, with circumradius 0.28 * size. With `rng` its
    radius is scaled by a factor in [0.8, 1.2], it is rotated by up to 15 degrees either way and
    moved by an offset that keeps it at least 0.06 * size away from every border.

    Args:
        combination: what to draw.
        size: image side in pixels, at least 32.
        rng: a numpy Generator for the jitter, or None for the canonical image.

    Returns:
        np.uint8 array [size, size, 3].

    Example:
        >>> image = render(Combination("star", "yellow", "black"), size=64)
        >>> image.shape, image.dtype, image[0, 0].tolist()
        ((64, 64, 3), dtype('uint8'), [20, 20, 20])
    """
    size = _check_size(size)
    radius, angle, offset = _RADIUS, 0.0, np.zeros(2)
    if rng is not None:
        radius *= rng.uniform(*_SCALE_JITTER)
        angle = np.deg2rad(rng.uniform(-_ROTATION_JITTER, _ROTATION_JITTER))
        offset = rng.uniform(-1.0, 1.0, size=2) * (0.5 - _MARGIN - radius)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = _outline(combination.shape) @ rotation.T * radius + offset  # in units of the side
    big = size * _SUPERSAMPLE
    xy = np.stack([0.5 + points[:, 0], 0.5 - points[:, 1]], axis=1) * big  # image y points down
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in xy], fill=255)
    alpha = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0
    alpha = alpha[..., None]
    foreground = np.asarray(COLORS[combination.color], np.float32)
    background = np.asarray(COLORS[combination.background], np.float32)
    return np.rint(alpha * foreground + (1.0 - alpha) * background).astype(np.uint8)


def make_dataset(
    n: int,
    size: int = 64,
    seed: int = 0,
    combinations: list[Combination] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Render `n` jittered images with their captions, reproducibly from `seed`.

    Combinations are drawn in shuffled rounds (each round uses every combination once), so
    counts stay balanced for any `n`.

    Args:
        n: number of images.
        size: image side in pixels, at least 32.
        seed: seed of the numpy Generator that picks combinations and jitter.
        combinations: what to draw from; `train_combinations()` when None.

    Returns:
        (images np.uint8 [n, size, size, 3], captions list of n strings).

    Example:
        >>> images, captions = make_dataset(8, size=32, seed=1)
        >>> images.shape, len(captions)
        ((8, 32, 32, 3), 8)
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer")
    n, size = int(n), _check_size(size)
    pool = list(train_combinations() if combinations is None else combinations)
    if not pool:
        raise ValueError("combinations is empty")
    rng = np.random.default_rng(seed)
    rounds = -(-n // len(pool))
    order = [i for _ in range(rounds) for i in rng.permutation(len(pool))][:n]
    images = np.zeros((n, size, size, 3), np.uint8)
    for i, index in enumerate(order):
        images[i] = render(pool[index], size=size, rng=rng)
    return images, [pool[index].caption for index in order]
