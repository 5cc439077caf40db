"""Every script in examples/ runs offline on the bundled tiny-shapes model and writes
its images."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
EXAMPLES = {
    "text_to_image.py": {"text_to_image.png": (128, 128)},
    "image_to_image.py": {"image_to_image_input.png": (64, 64), "image_to_image.png": (128, 128)},
    "inpaint.py": {"inpaint_input.png": (64, 64), "inpaint.png": (128, 128)},
    "outpaint.py": {"outpaint_input.png": (64, 64), "outpaint.png": (128, 192)},
    "textual_inversion.py": {
        "textual_inversion_input.png": (128, 192),
        "textual_inversion.png": (128, 128),
    },
}
# Few training steps keep the example's test short; it checks that the recipe runs.
ARGUMENTS = {"textual_inversion.py": ["20"]}


def test_every_example_is_tested():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_and_writes_its_images(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / script),
            str(tmp_path),
            *ARGUMENTS.get(script, []),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name, (height, width) in EXAMPLES[script].items():
        image = np.asarray(Image.open(tmp_path / name))
        assert image.shape == (height, width, 3) and image.std() > 10, name
    assert "False" not in result.stdout, result.stdout  # "pixels kept: False"
