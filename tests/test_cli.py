"""The `keras-sd` command line: argument errors are one line and exit non-zero."""

import numpy as np
import pytest

from keras_sd import cli


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
    grid = cli.image_grid(images)
    assert grid.shape == (4, 9, 3)  # 3 columns, 2 rows of 2-pixel-high images
    assert grid[0, 0, 0] == 1 and grid[0, 3, 0] == 2 and grid[0, 6, 0] == 3
    assert grid[2, 0, 0] == 4 and grid[2, 3, 0] == 5 and grid[2, 6, 0] == 0


def test_save_image_is_atomic(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        cli.save_image(np.zeros((2, 2, 7), np.uint8), str(target))  # PIL cannot write 7 channels
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
