"""Tests for keras_sd.shapes.checker: accuracy on clean, degraded and independently drawn images."""

import doctest
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from keras_sd.shapes import checker
from keras_sd.shapes.checker import check, read, score
from keras_sd.shapes.dataset import (
    COLORS,
    SHAPES,
    Combination,
    all_combinations,
    make_dataset,
    parse_caption,
    render,
)


def degrade(image, rng, jpeg_subsampling=2, blur=1.0, noise=10.0, shift=0.0):
    """What a small diffusion model might do: blur, colour noise and shift, JPEG quantisation.

    By default Gaussian blur radius 1, gaussian noise sigma 10/255 per channel, then JPEG
    quality 75 (subsampling 2 is 4:2:0 chroma subsampling, the common and harsher default).
    `shift` adds one uniform offset in [-shift, shift] per channel to the whole image.
    """
    image = Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur))
    offset = rng.uniform(-shift, shift, 3)
    noisy = np.asarray(image, np.float32) + rng.normal(0.0, noise, image.size + (3,)) + offset
    noisy = np.clip(np.rint(noisy), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(
        buffer, format="JPEG", quality=75, subsampling=jpeg_subsampling
    )
    return np.asarray(Image.open(buffer).convert("RGB"))


def accuracy(images, captions):
    """Fraction read correctly, and the first few mistakes for the failure message."""
    results = [check(image, caption) for image, caption in zip(images, captions, strict=True)]
    wrong = [(c, r) for c, r in zip(captions, results, strict=True) if not r.ok]
    return 1.0 - len(wrong) / len(captions), wrong[:5]


@pytest.fixture(scope="module")
def generated():
    """500 jittered 64 px images over all 150 combinations (held-out ones included)."""
    return make_dataset(500, size=64, seed=11, combinations=all_combinations())


def test_docstring_examples():
    assert doctest.testmod(checker).failed == 0


def test_reads_generated_images(generated):
    value, wrong = accuracy(*generated)
    print(f"clean 64 px accuracy: {value:.4f}")
    assert value >= 0.99, wrong


def test_reads_degraded_images(generated):
    images, captions = generated
    rng = np.random.default_rng(0)
    value, wrong = accuracy([degrade(image, rng) for image in images], captions)
    print(f"degraded 64 px accuracy: {value:.4f}")
    assert value >= 0.97, wrong


def test_reads_harshly_degraded_images(generated):
    images, captions = generated[0][:150], generated[1][:150]
    rng = np.random.default_rng(2)
    harsh = [degrade(image, rng, blur=2.0, noise=20.0, shift=30.0) for image in images]
    value, wrong = accuracy(harsh, captions)
    print(f"harshly degraded 64 px accuracy: {value:.4f}")
    assert value >= 0.97, wrong


def test_reads_small_images():
    images, captions = make_dataset(300, size=32, seed=5, combinations=all_combinations())
    rng = np.random.default_rng(1)
    clean, wrong = accuracy(images, captions)
    assert clean >= 0.99, wrong
    # At 32 px, 4:2:0 chroma subsampling leaves 16 px of colour detail; use full-resolution JPEG.
    degraded, wrong = accuracy([degrade(image, rng, 0) for image in images], captions)
    print(f"32 px accuracy: clean {clean:.4f}, degraded {degraded:.4f}")
    assert degraded >= 0.97, wrong


def test_rejects_wrong_prompts(generated):
    images, captions = generated
    names = list(COLORS)
    for i, (image, caption) in enumerate(zip(images[:120], captions[:120], strict=True)):
        truth = parse_caption(caption)
        other_shape = SHAPES[(SHAPES.index(truth.shape) + 1 + i % 4) % len(SHAPES)]
        free = [n for n in names if n not in (truth.color, truth.background)]
        other_color, other_background = free[i % 4], free[(i + 1) % 4]
        wrong_shape = check(image, Combination(other_shape, truth.color, truth.background).caption)
        assert not wrong_shape.ok and not wrong_shape.shape_ok
        assert wrong_shape.color_ok and wrong_shape.background_ok
        wrong_color = check(image, Combination(truth.shape, other_color, truth.background).caption)
        assert not wrong_color.ok and not wrong_color.color_ok and wrong_color.shape_ok
        wrong_back = check(image, Combination(truth.shape, truth.color, other_background).caption)
        assert not wrong_back.ok and not wrong_back.background_ok and wrong_back.color_ok


def _polygon_coverage(vertices, size, factor=4):
    """Anti-aliased coverage of a polygon (pixel units), by a numpy crossing-number test."""
    grid = (np.arange(size * factor) + 0.5) / factor
    x, y = np.meshgrid(grid, grid)
    inside = np.zeros(x.shape, bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
    return inside.reshape(size, factor, size, factor).mean(axis=(1, 3))


def _star(points, inner, radius, centre, turn):
    angles = turn + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, radius, inner * radius)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)


def _independent_drawings():
    """Shapes drawn without the generator, in proportions it never uses."""
    size = 64
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    yield "circle", (np.hypot(rows - 30, cols - 35) < 14).astype(float)
    yield "circle", (np.hypot(rows - 34, cols - 28) < 20).astype(float)
    yield "square", ((abs(rows - 30) < 12) & (abs(cols - 33) < 12)).astype(float)
    yield "square", _polygon_coverage(np.array([[32, 10], [52, 31], [31, 52], [10, 31]]), size)
    yield "triangle", _polygon_coverage(np.array([[12, 50], [52, 50], [32, 14]]), size)
    yield "triangle", _polygon_coverage(np.array([[14, 14], [50, 20], [24, 52]]), size)
    yield "star", _polygon_coverage(_star(5, 0.38, 22, (32, 33), -np.pi / 2), size)
    yield "star", _polygon_coverage(_star(5, 0.5, 18, (30, 30), 0.3), size)
    bar = lambda h, w: (abs(rows - 32) < h) & (abs(cols - 32) < w)  # noqa: E731
    yield "cross", (bar(20, 5) | bar(5, 20)).astype(float)
    yield "cross", (bar(16, 6) | bar(6, 22)).astype(float)


@pytest.mark.parametrize("index", range(10))
def test_reads_independent_drawings(index):
    shape, coverage = list(_independent_drawings())[index]
    fg, bg = np.array(COLORS["green"], float), np.array(COLORS["white"], float)
    image = np.rint(coverage[..., None] * fg + (1 - coverage[..., None]) * bg).astype(np.uint8)
    result = check(image, f"a green {shape} on a white background")
    assert result.ok, result
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1)))
    assert check(blurred, f"a green {shape} on a white background").ok


def test_blank_image_has_no_shape():
    image = np.full((64, 64, 3), COLORS["blue"], np.uint8)
    result = check(image, "a red circle on a blue background")
    assert result.background_ok and not result.ok
    assert (result.color, result.shape) == (None, None)


def test_ignores_small_specks_and_reads_big_and_pil_images():
    image = render(Combination("triangle", "white", "red"), size=64, rng=np.random.default_rng(2))
    image = image.copy()
    image[5:7, 50:52] = COLORS["white"]  # a stray blob away from the shape
    image[60, 10] = COLORS["white"]
    assert check(image, "a white triangle on a red background").ok
    big = render(Combination("cross", "black", "yellow"), size=256, rng=np.random.default_rng(3))
    assert check(big, "a black cross on a yellow background").ok
    assert check(Image.fromarray(big), "a black cross on a yellow background").ok


def test_score_and_errors(generated):
    images, captions = generated[0][:20], generated[1][:20]
    assert score(images, captions) == 1.0
    # Every odd image gets its neighbour's caption: a different combination, so it must fail.
    swapped = [captions[i] if i % 2 == 0 else captions[i - 1] for i in range(20)]
    assert all(swapped[i] != captions[i] for i in range(1, 20, 2))
    assert score(images, swapped) == 0.5
    with pytest.raises(ValueError, match="shapes caption"):
        score(images[:1], ["a red circles on a blue background"])
    with pytest.raises(ValueError, match="as many prompts"):
        score(images[:3], captions[:2])
    with pytest.raises(ValueError, match="RGB"):
        read(np.zeros((64, 64), np.uint8))
