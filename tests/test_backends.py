"""The end-to-end diffusers comparison again on the JAX and PyTorch backends.

A Keras process has one backend, so the check runs `tests/test_pipeline.py` as
a script in a subprocess with KERAS_BACKEND set, and applies the same tolerances.
"""

import json
import os
import subprocess
import sys

import pytest

from test_pipeline import assert_close

SCRIPT = os.path.join(os.path.dirname(__file__), "test_pipeline.py")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_text_to_image_matches_diffusers_on_backend(backend):
    env = {**os.environ, "KERAS_BACKEND": backend}
    run = subprocess.run(
        [sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert_close(result)
