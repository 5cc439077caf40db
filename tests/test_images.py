"""keras_sd.images (inputs of the image workflows) and keras_sd.utils (saving outputs)."""

import numpy as np
import pytest
from PIL import Image

from keras_sd import images, utils


def ramp(height=16, width=24) -> np.ndarray:
    """uint8 [H, W, 3] with distinct values per pixel and channel."""
    values = np.arange(height * width * 3).reshape(height, width, 3)
    return (values % 251).astype(np.uint8)


# ------------------------------------------------------------------------- images
def test_uint8_arrays_single_and_batched():
    one = images.read_images(ramp())
    assert one.shape == (1, 16, 24, 3) and one.dtype == np.float32
    np.testing.assert_allclose(one[0] * 255, ramp(), atol=1e-4)
    batch = images.read_images(np.stack([ramp(), ramp()[::-1]]))
    assert batch.shape == (2, 16, 24, 3)


@pytest.mark.parametrize("shape", [(16, 24), (16, 24, 1), (1, 16, 24, 1)])
def test_greyscale_arrays_become_rgb(shape):
    grey = np.arange(16 * 24).reshape(shape).astype(np.uint8)
    rgb = images.read_images(grey)
    assert rgb.shape == (1, 16, 24, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("value_range", [(0, 1), (-1, 1), (0, 255)])
def test_float_arrays_with_their_range(value_range):
    low, high = value_range
    unit = ramp().astype(np.float32) / 255.0
    out = images.read_images(low + unit * (high - low), value_range=value_range)
    np.testing.assert_allclose(out[0], unit, atol=1e-6)


@pytest.mark.parametrize(
    "array, kwargs, error, needle",
    [
        (
            np.zeros((8, 8, 3), np.float32),
            {},
            TypeError,
            "image is a float array: pass value_range",
        ),
        (
            np.full((8, 8, 3), 2.0),
            {"value_range": (0, 1)},
            ValueError,
            r"values must be in \[0, 1\]",
        ),
        (np.full((8, 8, 3), np.nan), {"value_range": (0, 1)}, ValueError, "values must be in"),
        (np.zeros((8, 8, 3)), {"value_range": (0, 2)}, ValueError, "value_range must be one of"),
        (np.zeros((8, 8, 3), np.uint8), {"value_range": (0, 1)}, ValueError, "read as 0-255"),
        (np.full((8, 8, 3), 300), {}, ValueError, r"values must be in \[0, 255\]"),
        (np.zeros((8, 8, 4), np.uint8), {}, ValueError, r"\(RGBA or latents\?\)"),
        (np.zeros((3, 8, 8), np.uint8), {}, ValueError, "channels-last RGB"),
        (np.zeros((1, 1, 8, 8, 3), np.uint8), {}, ValueError, "channels-last RGB"),
        (np.zeros((8, 8, 3), bool), {}, TypeError, "image must hold numbers"),
        (None, {}, TypeError, "image must be an array"),
        (3, {}, TypeError, "image must be an array"),
    ],
)
def test_bad_image_arrays_name_the_argument(array, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        images.read_images(array, **kwargs)


def test_pil_images_paths_and_lists(tmp_path):
    rgb = Image.fromarray(ramp())
    np.testing.assert_allclose(images.read_images(rgb)[0] * 255, ramp(), atol=1e-4)
    rgba = np.concatenate([ramp(), np.zeros((16, 24, 1), np.uint8)], axis=-1)
    # Pillow's convert("RGB") drops the alpha channel, as diffusers' loaders do.
    np.testing.assert_allclose(
        images.read_images(Image.fromarray(rgba))[0] * 255, ramp(), atol=1e-4
    )
    grey = images.read_images(Image.fromarray(ramp()[..., 0]))
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
    palette = images.read_images(rgb.convert("P"))
    assert palette.shape == (1, 16, 24, 3)
    rgb.save(tmp_path / "a.png")
    Image.fromarray(rgba).save(tmp_path / "b.png")
    from_paths = images.read_images([tmp_path / "a.png", str(tmp_path / "b.png")])
    assert from_paths.shape == (2, 16, 24, 3)
    np.testing.assert_array_equal(from_paths[0], from_paths[1])
    with pytest.raises(ValueError, match="value_range applies to arrays only"):
        images.read_images(rgb, value_range=(0, 1))


def test_unreadable_paths_and_mixed_sizes(tmp_path):
    with pytest.raises(ValueError, match="image: cannot read an image from '/no/such.png'"):
        images.read_images("/no/such.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read an image from"):
        images.read_images(tmp_path / "text.png")
    with pytest.raises(ValueError, match="must have one size"):
        images.read_images([Image.fromarray(ramp()), Image.fromarray(ramp(8, 8))])
    with pytest.raises(ValueError, match="--image: cannot read"):
        images.read_images(tmp_path, name="--image")  # a folder


def test_sizes_must_be_multiples_of_the_factor():
    with pytest.raises(ValueError, match="image size 60x100 .* multiple of 8.* nearest valid size"):
        images.load_images(ramp(60, 100), factor=8)
    resized = images.load_images(ramp(60, 100), factor=8, resize=True)
    assert resized.shape == (1, 64, 96, 3)
    assert 0.0 <= resized.min() and resized.max() <= 1.0
    assert images.load_images(ramp(3, 5), factor=8, resize=True).shape == (1, 8, 8, 3)
    masks = images.fit_to_factor(np.ones((1, 60, 100, 1), np.float32), 8, resize=True)
    assert masks.shape == (1, 64, 96, 1)


# -------------------------------------------------------------------------- masks
@pytest.mark.parametrize(
    "mask",
    [
        np.eye(8, dtype=bool),
        np.eye(8, dtype=np.uint8) * 255,
        np.eye(8, dtype=np.float32),
        np.eye(8, dtype=np.int64),
        np.eye(8, dtype=np.float32)[..., None],
        np.eye(8, dtype=np.float32)[None],
        np.eye(8, dtype=np.float32)[None, ..., None],
        Image.fromarray(np.eye(8, dtype=np.uint8) * 255),
        Image.fromarray(np.repeat(np.eye(8, dtype=np.uint8)[..., None] * 255, 3, axis=-1)),
    ],
)
def test_mask_forms(mask):
    out = images.read_masks(mask, (8, 8))
    assert out.shape == (1, 8, 8, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, ..., 0], np.eye(8))


def test_mask_paths_and_soft_values(tmp_path):
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "m.png")
    out = images.read_masks([tmp_path / "m.png", str(tmp_path / "m.png")], (8, 8))
    assert out.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(out, 128 / 255)


@pytest.mark.parametrize(
    "mask, needle",
    [
        (np.full((8, 8), 1.5), r"mask values must be in \[0, 1\]"),
        (np.full((8, 8), -0.1), r"mask values must be in \[0, 1\]"),
        (np.full((8, 8), np.nan), r"mask values must be in \[0, 1\]"),
        (np.ones((8, 8, 3)), "mask must have one channel"),
        (np.ones((1, 8, 8, 2)), "mask must have one channel"),
        (np.ones((4, 4)), "mask size 4x4 does not match the image's 8x8"),
        (np.ones((1, 1, 1, 8, 8)), "mask must be"),
        ("/no/such/mask.png", "mask: cannot read"),
    ],
)
def test_bad_masks_name_the_argument(mask, needle):
    with pytest.raises(ValueError, match=needle):
        images.read_masks(mask, (8, 8))


def test_latent_mask_keeps_the_largest_value_of_each_cell():
    masks = np.zeros((1, 4, 6, 1), np.float32)
    masks[0, 1, 1] = 0.25
    masks[0, 0, 5] = 1.0
    np.testing.assert_array_equal(
        images.latent_mask(masks, 2)[0, ..., 0], [[0.25, 0.0, 1.0], [0.0, 0.0, 0.0]]
    )


def test_feather_stays_inside_the_mask():
    masks = np.zeros((2, 16, 16, 1), np.float32)
    masks[0, 4:12, 4:12] = 1.0
    masks[1, :, 8:] = 0.5  # soft, and touching the image border
    weights = images.feather(masks, 2)
    assert (weights[masks == 0] == 0).all()
    assert (weights <= masks).all()
    np.testing.assert_allclose(weights[0, 4:12, 4, 0][1:-1], 1 / 3)  # the edge column
    np.testing.assert_allclose(weights[0, 8, 4:8, 0], [1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(weights[1, 0, 8:, 0], [0.5 / 3, 1 / 3] + [0.5] * 6)


def test_paste_back_keeps_unmasked_pixels_exactly():
    original = ramp()[None].astype(np.float32) / 255.0
    generated = np.full((1, 16, 24, 3), 7, np.uint8)
    masks = np.zeros((1, 16, 24, 1), np.float32)
    masks[0, 4:12, 6:18] = 1.0
    out = images.paste_back(generated, original, masks, 2)
    keep = masks[0, ..., 0] == 0
    np.testing.assert_array_equal(out[0][keep], ramp()[keep])
    np.testing.assert_array_equal(out[0, 7:9, 10:14], 7)  # the inside beyond the feather


def test_extend_canvas_rounds_up_and_fills_from_the_edges():
    image = images.read_images(ramp(16, 24))
    canvas, masks, used = images.extend_canvas(image, (0, 5, 8, 3), 8)
    assert used == (0, 8, 8, 8)
    assert canvas.shape == (1, 24, 40, 3) and masks.shape == (1, 24, 40, 1)
    np.testing.assert_array_equal(canvas[:, :16, 8:32], image)
    np.testing.assert_array_equal(canvas[0, :16, 0], image[0, :, 0])  # left: first column
    np.testing.assert_array_equal(canvas[0, 23, 8:32], image[0, -1])  # bottom: last row
    assert (masks[:, :16, 8:32] == 0).all() and masks.sum() == 24 * 40 - 16 * 24
    assert images.extend_canvas(image, 8, 8)[0].shape == (1, 32, 40, 3)


@pytest.mark.parametrize("extend", [(0, 8), (0, -8, 0, 0), (0, 8.0, 0, 0), "8", (True, 0, 0, 0)])
def test_bad_extend(extend):
    with pytest.raises(ValueError, match="extend must be"):
        images.extend_canvas(np.zeros((1, 8, 8, 3)), extend, 8)


# ------------------------------------------------------------------------- saving
def test_to_pil_and_save_images(tmp_path):
    batch = np.stack([ramp(), ramp()[::-1], ramp()])
    assert utils.to_pil(batch[0]).size == (24, 16)
    pils = utils.to_pil(batch)
    assert len(pils) == 3 and np.array_equal(np.asarray(pils[1]), batch[1])
    one = utils.save_images(batch[:1], tmp_path / "one.png")
    np.testing.assert_array_equal(np.asarray(Image.open(one)), batch[0])
    grid = utils.save_images(batch, tmp_path / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(grid)), utils.image_grid(batch))
    with pytest.raises(TypeError, match="images must be uint8"):
        utils.save_images(batch.astype(np.float32), tmp_path / "bad.png")
    with pytest.raises(TypeError, match="images must be uint8"):
        utils.to_pil(np.zeros((4, 4, 7), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "one.png"]
