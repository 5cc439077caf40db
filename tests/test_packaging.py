"""The package as users get it: `python -m build` makes an sdist and a wheel with the
bundled assets, and the wheel, installed in a fresh virtual environment, runs
`keras-sd generate` on the bundled model from a directory with no source checkout."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import keras_sd
from keras_sd.shapes.checker import check

ROOT = Path(__file__).parents[1]
ASSETS = ("bpe_simple_vocab_16e6.txt.gz", "tiny-shapes.safetensors", "LICENSE-open_clip.txt")
PROMPT = "a red circle on a blue background"


def _clean_env() -> dict:
    """The environment without anything that points Python at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "PIP_NO_INDEX": "1", "PIP_NO_INPUT": "1"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist and wheel built from a copy of the project, so the checkout stays untouched.

    `--no-isolation` builds with the installed setuptools: tests never use the network.
    The wheel is built from the sdist, so a file missing from the sdist fails here too.
    """
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in result.stderr, result.stderr[-3000:]
    return out


def test_sdist_and_wheel_carry_the_assets_and_metadata(dist):
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    assert sdist.name == f"keras_sd-{keras_sd.__version__}.tar.gz"
    with tarfile.open(sdist) as archive:
        sdist_names = archive.getnames()
    with zipfile.ZipFile(wheel) as archive:
        wheel_names = archive.namelist()
        (metadata_name,) = [n for n in wheel_names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        entry_points = archive.read(metadata_name.replace("METADATA", "entry_points.txt"))
    for asset in ASSETS:
        assert f"keras_sd/assets/{asset}" in wheel_names, asset
        assert any(n.endswith(f"src/keras_sd/assets/{asset}") for n in sdist_names), asset
    assert metadata["Version"] == keras_sd.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert any(
        c.startswith("Programming Language :: Python :: 3") for c in metadata.get_all("Classifier")
    )
    assert b"keras-sd = keras_sd.cli:main" in entry_points
    assert not any("/tests/" in n or n.startswith("tests/") for n in wheel_names)


def test_wheel_installs_in_a_fresh_venv_and_generates(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    # The venv sees the installed dependencies (no network) but gets keras-sd from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, command = venv / "bin" / "python", venv / "bin" / "keras-sd"
    env = _clean_env()
    install = subprocess.run(
        # --ignore-installed: a regular (non-editable) keras-sd in the base site-packages,
        # as CI installs it, would otherwise count as already satisfied.
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--ignore-installed",
            "--quiet",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import keras_sd; print(keras_sd.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # not this checkout, not another install

    result = subprocess.run(
        [str(command), "generate", PROMPT, "-o", "circle.png", "--seed", "1"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(elsewhere / "circle.png"))
    assert image.shape == (64, 64, 3)
    assert check(image, PROMPT).ok  # the bundled model itself answered the prompt
