"""Component replacement and the token-id check on JAX.

tests/test_construction.py runs on the suite's backend (TensorFlow). JAX is where an
out-of-range token id fails silently (its gather clamps the index instead of raising),
and where a replaced component would be missed if a compiled program kept the old
one, so the same tests run again in a JAX process.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = (
    "test_assigned_unet_is_used_on_the_next_call",
    "test_assigned_encoder_or_decoder_is_used_on_the_next_call",
    "test_assigned_scheduler_is_used_on_the_next_call",
    "test_added_token_without_embedding_row_is_refused",
)


def test_replacement_and_token_check_on_jax():
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        "-q",
        "-o",
        "addopts=",
        os.path.join(ROOT, "tests", "test_construction.py"),
        "-k",
        " or ".join(TESTS),
    ]
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    # Five tests (the encoder/decoder one is parametrized twice), all run, none skipped.
    assert "5 passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
    probe = [sys.executable, "-c", "import keras; print(keras.backend.backend())"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "jax"
