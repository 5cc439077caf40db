"""Tests for keras_sd.shapes.dataset: combinations, captions and rendering geometry."""

import doctest
import itertools

import numpy as np
import pytest

from keras_sd.shapes import dataset
from keras_sd.shapes.dataset import (
    COLORS,
    HELD_OUT,
    SHAPES,
    Combination,
    all_combinations,
    make_dataset,
    parse_caption,
    render,
    train_combinations,
)


def test_docstring_examples():
    assert doctest.testmod(dataset).failed == 0


def test_palette_is_well_separated():
    rgb = np.array(list(COLORS.values()), float)
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert len(SHAPES) >= 4 and len(COLORS) == 6
    assert min(distances) > 150


@pytest.mark.parametrize(
    "args, word",
    [
        (("hexagon", "red", "blue"), "hexagon"),
        (("circle", "purple", "blue"), "purple"),
        (("circle", "red", "grey"), "grey"),
        (("circle", "red", "red"), "red"),
    ],
)
def test_combination_rejects_invalid(args, word):
    with pytest.raises(ValueError, match=word):
        Combination(*args)


def test_all_combinations():
    combos = all_combinations()
    assert len(combos) == len(set(combos)) == len(SHAPES) * 6 * 5
    assert all(c.color != c.background for c in combos)


def test_held_out_split():
    combos, train, held = all_combinations(), train_combinations(), list(HELD_OUT)
    assert len(held) == len(set(held)) == len(combos) // 10
    assert set(held) <= set(combos) and not set(held) & set(train)
    assert sorted(train + held, key=combos.index) == combos
    # Each held-out combination is new, but all its parts and pairs of parts are trained.
    for getters in [("shape",), ("color",), ("background",)] + [
        pair for pair in itertools.combinations(("shape", "color", "background"), 2)
    ]:
        seen = {tuple(getattr(c, g) for g in getters) for c in train}
        assert all(tuple(getattr(c, g) for g in getters) in seen for c in held), getters
    assert {s: sum(c.shape == s for c in held) for s in SHAPES} == dict.fromkeys(SHAPES, 3)


def test_caption_round_trip_and_tolerance():
    for combo in all_combinations():
        assert parse_caption(combo.caption) == combo
    assert parse_caption("  A Yellow  STAR on an black background. ") == Combination(
        "star", "yellow", "black"
    )
    assert Combination("circle", "red", "blue").caption == "a red circle on a blue background"


@pytest.mark.parametrize(
    "text",
    [
        "a purple circle on a blue background",
        "a red circle on a red background",
        "a red hexagon on a blue background",
        "a red circle",
        "",
    ],
)
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError, match="shapes caption") as info:
        parse_caption(text)
    assert repr(text) in str(info.value)


def _coverage(image, combo):
    """Per-pixel fraction of the shape, recovered from the blend of the two palette colours."""
    fg, bg = (np.array(COLORS[name], float) for name in (combo.color, combo.background))
    channel = np.argmax(np.abs(fg - bg))
    return (image[..., channel] - bg[channel]) / (fg[channel] - bg[channel])


def _analytic_area(shape, radius):
    """Area of each shape with circumradius `radius`, from plane geometry."""
    if shape == "circle":
        return np.pi * radius**2
    if shape == "square":
        return 2 * radius**2
    if shape == "triangle":
        return 3 * np.sqrt(3) / 4 * radius**2
    if shape == "star":  # ten triangles between alternating outer and inner points
        return 5 * radius * (0.45 * radius) * np.sin(np.pi / 5)
    half = 0.3 * radius  # cross: two bars of length 2*reach and width 2*half, minus the overlap
    reach = np.sqrt(radius**2 - half**2)
    return 2 * (2 * reach) * (2 * half) - (2 * half) ** 2


@pytest.mark.parametrize("shape", SHAPES)
def test_canonical_render_geometry(shape):
    combo = Combination(shape, "red", "blue")
    image = render(combo, size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(render(combo, size=64), image)
    coverage = _coverage(image.astype(float), combo)
    area = _analytic_area(shape, 0.28 * 64)
    # PIL fills polygon edges inclusively, a bias of about half a supersampled pixel outward.
    assert 0 <= (coverage.sum() - area) / area < 0.025
    assert (image[0] == COLORS["blue"]).all() and (image[:, -1] == COLORS["blue"]).all()
    assert (image[31:33, 31:33] == COLORS["red"]).all()
    rows = np.arange(64)[:, None]
    centroid = (coverage * rows).sum() / coverage.sum(), (coverage * rows.T).sum() / coverage.sum()
    np.testing.assert_allclose(centroid, (31.5, 31.5), atol=0.05)


def test_triangle_points_up():
    combo = Combination("triangle", "red", "blue")
    coverage = _coverage(render(combo).astype(float), combo)
    widths = (coverage > 0.5).sum(axis=1)
    rows = np.nonzero(widths)[0]
    assert widths[rows[0]] < 4 and widths[rows[-1]] > 20


def test_jitter_is_bounded_and_varied():
    rng = np.random.default_rng(0)
    combo = Combination("square", "white", "black")
    areas, centres = [], []
    for _ in range(200):
        image = render(combo, size=64, rng=rng)
        ring = np.concatenate(
            [
                image[:3].reshape(-1, 3),
                image[-3:].reshape(-1, 3),
                image[:, :3].reshape(-1, 3),
                image[:, -3:].reshape(-1, 3),
            ]
        )
        assert (ring == COLORS["black"]).all()
        coverage = _coverage(image.astype(float), combo)
        rows, cols = np.nonzero(coverage > 0.5)
        areas.append(coverage.sum())
        centres.append((rows.mean(), cols.mean()))
    nominal = _analytic_area("square", 0.28 * 64)
    assert 0.8**2 * 0.98 < min(areas) / nominal < 0.7 and 1.3 < max(areas) / nominal < 1.2**2 * 1.02
    assert np.ptp(np.array(centres), axis=0).min() > 8


def test_render_rejects_small_size():
    with pytest.raises(ValueError, match="size=16"):
        render(Combination("circle", "red", "blue"), size=16)


def test_make_dataset_is_reproducible_and_balanced():
    images, captions = make_dataset(270, size=32, seed=3)
    assert images.shape == (270, 32, 32, 3) and images.dtype == np.uint8
    again, same = make_dataset(270, size=32, seed=3)
    np.testing.assert_array_equal(images, again)
    assert captions == same
    other, _ = make_dataset(270, size=32, seed=4)
    assert not np.array_equal(images, other)
    counts = {c.caption: captions.count(c.caption) for c in train_combinations()}
    assert set(counts.values()) == {2} and len(set(captions)) == 135
    assert not {c.caption for c in HELD_OUT} & set(captions)


def test_make_dataset_with_given_combinations():
    pool = list(HELD_OUT[:2])
    images, captions = make_dataset(5, size=32, seed=0, combinations=pool)
    assert set(captions) <= {c.caption for c in pool}
    first = [captions.count(c.caption) for c in pool]
    assert sorted(first) == [2, 3]
    for image, caption in zip(images, captions, strict=True):
        background = parse_caption(caption).background
        assert (image[0, 0] == COLORS[background]).all()
    assert make_dataset(0, size=32)[0].shape == (0, 32, 32, 3)
    with pytest.raises(ValueError, match="empty"):
        make_dataset(3, combinations=[])
