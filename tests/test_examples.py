"""Every script in examples/ runs offline on the bundled tiny-shapes model and writes
its images.

The scripts run one after another in one child process (as `__main__`, with their own
argv), so the start-up of TensorFlow and keras-sd is paid once; each test checks its
own script's images and printout.
"""

import json
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

RUN_ALL = """
import contextlib, io, json, runpy, sys, traceback
out_dir, runs = sys.argv[1], {}
for script, arguments in json.loads(sys.argv[2]).items():
    printed = io.StringIO()
    sys.argv = [script, out_dir, *arguments]
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(script, run_name="__main__")
        runs[script] = {"stdout": printed.getvalue()}
    except BaseException:
        runs[script] = {"stdout": printed.getvalue(), "error": traceback.format_exc()}
print(json.dumps(runs))
"""


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """Each example's printout (and traceback if it failed), all written to one folder."""
    out_dir = tmp_path_factory.mktemp("examples")
    scripts = {str(ROOT / "examples" / name): ARGUMENTS.get(name, []) for name in EXAMPLES}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", RUN_ALL, str(out_dir), json.dumps(scripts)],
        cwd=out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    return out_dir, {Path(script).name: run for script, run in runs.items()}


def test_every_example_is_tested():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs_and_writes_its_images(example_runs, script):
    out_dir, runs = example_runs
    run = runs[script]
    assert "error" not in run, run.get("error")
    for name, (height, width) in EXAMPLES[script].items():
        image = np.asarray(Image.open(out_dir / name))
        assert image.shape == (height, width, 3) and image.std() > 10, name
    assert "False" not in run["stdout"], run["stdout"]  # "pixels kept: False"
