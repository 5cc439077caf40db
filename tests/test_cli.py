"""The `keras-sd` command line: argument errors are one line and exit non-zero."""

import os
import stat

import numpy as np
import pytest
from PIL import Image

from keras_sd import cli, utils


def run_cli(capsys, *argv):
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:  # argparse errors
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--preset", "no-such-model"], "unknown --preset 'no-such-model'"),
        (["--steps", "-3"], "--steps must be a positive integer"),
        (["--steps", "many"], "--steps must be an integer"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["-o", "out.txt"], "--output must end in .png"),
        (["-o", "/no/such/folder/out.png"], "does not exist"),
        (["--checkpoint", "/no/such/model.safetensors"], "does not exist"),
    ],
)
def test_bad_arguments_fail_with_one_line(capsys, tmp_path, argv, needle):
    if "-o" not in argv:
        argv = [*argv, "-o", str(tmp_path / "out.png")]
    status, out, err = run_cli(capsys, "generate", "a red circle", *argv)
    assert status != 0
    lines = [line for line in err.strip().splitlines() if line.startswith(("keras-sd", "usage"))]
    assert needle in err, err
    assert "Traceback" not in err
    assert lines, err
    assert not (tmp_path / "out.png").exists()


def test_output_path_that_is_a_folder(capsys, tmp_path):
    folder = tmp_path / "taken.png"
    folder.mkdir()
    status, _, err = run_cli(capsys, "generate", "x", "-o", str(folder))
    assert status == 2 and "is a folder" in err and folder.is_dir()


def test_existing_output_is_untouched_when_arguments_are_bad(capsys, tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"user data")
    status, _, _ = run_cli(capsys, "generate", "x", "--preset", "nope", "-o", str(target))
    assert status == 2 and target.read_bytes() == b"user data"


def test_image_grid_places_each_image():
    images = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(1, 6)])
    grid = utils.image_grid(images)
    assert grid.shape == (4, 9, 3)  # 3 columns, 2 rows of 2-pixel-high images
    assert grid[0, 0, 0] == 1 and grid[0, 3, 0] == 2 and grid[0, 6, 0] == 3
    assert grid[2, 0, 0] == 4 and grid[2, 3, 0] == 5 and grid[2, 6, 0] == 0


def test_save_image_is_atomic(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        utils.save_image(np.zeros((2, 2, 7), np.uint8), str(target))  # PIL cannot write 7 channels
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_saved_image_has_a_new_files_permissions(tmp_path):
    # A temporary file from tempfile.mkstemp would be owner-only; the image must not be.
    target = tmp_path / "a.png"
    umask = os.umask(0o022)
    try:
        utils.save_image(np.zeros((2, 2, 3), np.uint8), str(target))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert np.asarray(Image.open(target)).tolist() == np.zeros((2, 2, 3), int).tolist()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight tiny model saved as a CompVis single file; (path, model)."""
    from keras_sd import StableDiffusion
    from keras_sd.weights.checkpoint import save_checkpoint

    sd = StableDiffusion(64, 64, config="tiny", jit_compile=False)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(sd, path)
    return path, sd


def _weights(sd) -> dict:
    from keras_sd.weights.state_dict import named_variables

    return {
        f"{attr}.{name}": np.asarray(var.numpy())
        for attr in ("text_encoder", "diffusion_model", "decoder", "image_encoder")
        for name, var in named_variables(getattr(sd, attr)).items()
    }


@pytest.mark.parametrize(
    "dst, dtype, layout",
    [
        ("folder", None, None),
        ("copy.safetensors", "float16", None),
        ("k.safetensors", None, "keras"),
    ],
)
def test_convert_round_trip(capsys, tmp_path, tiny_checkpoint, dst, dtype, layout):
    from keras_sd import StableDiffusion

    src, sd = tiny_checkpoint
    argv = ["convert", str(src), str(tmp_path / dst), "--config", "tiny"]
    argv += ["--dtype", dtype] if dtype else []
    status, out, err = run_cli(capsys, *argv, *(["--layout", layout] if layout else []))
    assert status == 0, err
    assert f"wrote {tmp_path / dst}" in out
    config = {} if layout == "keras" else {"config": "tiny"}  # a keras-layout file has its own
    loaded = StableDiffusion.from_checkpoint(tmp_path / dst, jit_compile=False, **config)
    expected, got = _weights(sd), _weights(loaded)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        if dtype == "float16":  # the file holds float16: equal after the same rounding
            value = value.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_convert_refuses_to_overwrite(capsys, tmp_path, tiny_checkpoint):
    src, _ = tiny_checkpoint
    target = tmp_path / "taken.safetensors"
    target.write_bytes(b"user data")
    status, _, err = run_cli(capsys, "convert", str(src), str(target), "--config", "tiny")
    assert status == 2 and "--overwrite" in err and "Traceback" not in err
    assert target.read_bytes() == b"user data"
    status, _, err = run_cli(capsys, "convert", str(src), str(src), "--overwrite")
    assert status == 2 and "is SRC itself" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["/no/such.ckpt", "out.safetensors"], "SRC '/no/such.ckpt' does not exist"),
        (["SRC", "/no/such/folder/out.safetensors"], "folder of DST"),
        (["SRC", "out.safetensors", "--layout", "onnx"], "invalid choice: 'onnx'"),
    ],
)
def test_convert_bad_arguments(capsys, tmp_path, tiny_checkpoint, argv, needle):
    argv = [str(tiny_checkpoint[0]) if a == "SRC" else a for a in argv]
    argv = [str(tmp_path / a) if a == "out.safetensors" else a for a in argv]
    status, _, err = run_cli(capsys, "convert", *argv)
    assert status == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_offers_every_checkpoint_layout():
    # The command lists them itself so that `--help` and argument errors need no Keras.
    from keras_sd import cli
    from keras_sd.weights.checkpoint import LAYOUTS

    assert cli.LAYOUTS == LAYOUTS


# ------------------------------------------------------------ img2img, inpaint, outpaint
@pytest.fixture(scope="module")
def shape_files(tmp_path_factory):
    """A tiny-shapes render, a mask for it and a mask of another size, as PNG files."""
    from keras_sd.shapes import dataset

    folder = tmp_path_factory.mktemp("inputs")
    image = dataset.render(dataset.Combination("circle", "red", "blue"))
    Image.fromarray(image).save(folder / "image.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[12:52, 12:52] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:32, :32]).save(folder / "small_mask.png")
    Image.fromarray(image[:60]).save(folder / "odd.png")
    return folder, image, mask


IMAGE_COMMANDS = {
    "img2img": ["--strength", "0.6"],
    "inpaint": ["--mask", "MASK"],
    "outpaint": ["--extend", "0,16,0,16"],
}


@pytest.mark.parametrize(
    "command, argv, needle",
    [
        ("img2img", ["--strength", "1.5"], "--strength must be in [0, 1], got 1.5"),
        ("img2img", ["--strength", "most"], "--strength must be a number"),
        ("img2img", ["--image", "/no/such.png"], "--image: cannot read an image from"),
        ("img2img", ["--image", "ODD"], "image size 60x64 (height x width) is not a multiple"),
        ("inpaint", ["--mask", "/no/such.png"], "--mask: cannot read an image from"),
        ("inpaint", ["--mask", "SMALL"], "--mask size 32x32 does not match the image's 64x64"),
        ("outpaint", ["--extend", "0,16,0"], "--extend must be TOP,RIGHT,BOTTOM,LEFT"),
        ("outpaint", ["--extend", "0,-8,0,0"], "--extend must be TOP,RIGHT,BOTTOM,LEFT"),
        ("outpaint", ["--extend", "0"], "extend must grow at least one side"),
    ],
)
def test_image_commands_bad_arguments(capsys, tmp_path, shape_files, command, argv, needle):
    folder = shape_files[0]
    files = {"MASK": "mask.png", "SMALL": "small_mask.png", "ODD": "odd.png"}
    defaults = [*IMAGE_COMMANDS[command], "--image", str(folder / "image.png")]
    argv = [str(folder / files[a]) if a in files else a for a in defaults + argv]
    out = tmp_path / "out.png"
    status, _, err = run_cli(
        capsys,
        command,
        "a red circle on a blue background",
        *argv,
        "-o",
        str(out),
        "--steps",
        "2",
        "--no-compile-cache",
    )
    assert status == 2 and needle in err and "Traceback" not in err, err
    assert "error: " in err.strip().splitlines()[-1], err
    assert not out.exists()


def test_image_commands_write_their_images(capsys, tmp_path, shape_files):
    folder, image, mask = shape_files
    expected = {"img2img": (64, 64), "inpaint": (64, 64), "outpaint": (64, 96)}
    for command, size in expected.items():
        out = tmp_path / f"{command}.png"
        argv = [str(folder / "mask.png") if a == "MASK" else a for a in IMAGE_COMMANDS[command]]
        status, stdout, err = run_cli(
            capsys,
            command,
            "a green circle on a blue background",
            "--image",
            str(folder / "image.png"),
            *argv,
            "-o",
            str(out),
            "--steps",
            "3",
            "--seed",
            "1",
            "--batch-size",
            "2",
            "--no-compile-cache",
        )
        assert status == 0, err
        assert f"wrote {out} (2 images)" in stdout
        grid = np.asarray(Image.open(out))
        assert grid.shape == (size[0], 2 * size[1], 3)  # two images side by side
        if command == "inpaint":
            keep = mask == 0
            np.testing.assert_array_equal(grid[:, :64][keep], image[keep])
        if command == "outpaint":
            np.testing.assert_array_equal(grid[:, 16:80], image)
