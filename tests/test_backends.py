"""The end-to-end diffusers comparison again on the JAX and PyTorch backends, and
backend-specific checks that need a process of their own.

A Keras process has one backend: on PyTorch the comparison runs `tests/test_pipeline.py`
as a script in a subprocess with KERAS_BACKEND set; the JAX checks read the session's
shared JAX child (tests/backend_children.py). Both apply test_pipeline's tolerances.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from backend_children import JAX_GROUP, jax_results, task_result  # noqa: F401
from test_pipeline import assert_close

SCRIPT = os.path.join(os.path.dirname(__file__), "test_pipeline.py")


@pytest.mark.xdist_group(JAX_GROUP)
def test_text_to_image_matches_diffusers_on_jax(jax_results):  # noqa: F811
    assert jax_results["backend"] == "jax"
    assert_close(task_result(jax_results, "pipeline"))


def test_text_to_image_matches_diffusers_on_torch():
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    run = subprocess.run(
        [sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert_close(json.loads(run.stdout.strip().splitlines()[-1]))


@pytest.mark.xdist_group(JAX_GROUP)
def test_float16_attention_compiles_on_jax_cpu(jax_results):  # noqa: F811
    """mixed_float16 on JAX's CPU backend: jit-compiled float16 attention must run
    (jax.nn's fused attention does not compile there) and match a float64 softmax
    attention to float16 rounding, causal and not."""
    errors = task_result(jax_results, "float16_attention")
    assert sorted(errors) == ["False", "True"], errors
    for dtype, error in errors.values():
        assert dtype == "float16" and error < 4e-3, errors


BORROW_CHECK = """
import numpy as np, keras
from keras_sd.backend import borrow_numpy
from keras_sd.backend import aligned_empty
raw = aligned_empty((4 * 65,), "uint8")
misaligned = raw[4:4 + 4 * 64].view("float32").reshape(8, 8)
misaligned[:] = np.arange(64, dtype="float32").reshape(8, 8)
assert borrow_numpy(misaligned) is None, "a misaligned array was shared"
assert borrow_numpy(np.asfortranarray(np.ones((8, 8), "float32"))) is None
aligned = aligned_empty((8, 8), "float32")
aligned[:] = misaligned
shared = borrow_numpy(aligned)
assert shared is not None, "an aligned array was not shared on TensorFlow/CPU"
out = keras.ops.convert_to_numpy(keras.ops.transpose(shared))
np.testing.assert_array_equal(out, misaligned.T)
print("borrow ok")
"""


def run_tensorflow_child(script: str, *argv: str, allocator: str | None = None):
    """Run `script` in a fresh TensorFlow/CPU process; (return code, stdout, stderr).
    `allocator` sets TF_CPU_ALLOCATOR_USE_BFC; None leaves it unset."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    env.pop("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", None)  # the test session's, not a user's
    if allocator is not None:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = allocator
    run = subprocess.run(
        [sys.executable, "-c", script, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return run.returncode, run.stdout, run.stderr


def test_borrow_numpy_shares_only_aligned_arrays(import_only_child):
    """TensorFlow aborts the process on an unaligned DLPack buffer: the check runs
    in a child so that a regression fails this test instead of killing the suite."""
    returncode, out, err = import_only_child
    assert returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == "borrow ok", out


POOL_CHECK = """
import os, resource, sys, warnings
if sys.argv[1] == "tensor-first":
    import tensorflow as tf
    tf.ones(3)
import keras_sd
import tensorflow as tf
from keras_sd import backend

imported = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    asked = None if sys.argv[1] == "import-only" else backend.use_pooled_host_memory()

def page_faults_of_a_new_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tf.random.uniform((64, 1024, 1024)).shape  # 256 MB, written in full
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

page_faults_of_a_new_buffer()  # whatever it holds on to, it has it now
# 65,536 pages: a pool hands back the freed buffer, otherwise it is mapped afresh.
print("pool", imported, os.environ.get("TF_CPU_ALLOCATOR_USE_BFC"), asked, len(caught),
      backend.host_memory_pooled(), page_faults_of_a_new_buffer() < 16384, flush=True)
"""


@pytest.fixture(scope="module")
def import_only_child():
    """The import-only pool check, then the borrow check, in one fresh TensorFlow
    process: both want the allocator setting unset, and the borrow check runs after
    the pool line is out so that it neither moves the page faults nor, by aborting,
    hides them. (return code, stdout, stderr)"""
    return run_tensorflow_child(POOL_CHECK + BORROW_CHECK, "import-only")


@pytest.mark.parametrize(
    "setting, order, variable, answer, pooled",
    [
        (None, "import-only", None, "None", None),  # importing keras_sd changes no setting
        (None, "ask-first", "true", "True", True),  # use_pooled_host_memory requests the pool
        ("false", "ask-first", "false", "False", None),  # the user's choice is kept
        (None, "tensor-first", None, None, None),  # too late: TensorFlow has chosen already
    ],
)
def test_pooled_host_memory_is_opt_in(request, setting, order, variable, answer, pooled):
    """`import keras_sd` leaves TensorFlow's allocator alone; `use_pooled_host_memory`
    before TensorFlow's first tensor selects the pooling CPU allocator unless the user
    chose, and warns when it is too late; `host_memory_pooled` tells whether freed
    memory is reused, as page faults show.

    Without the request TensorFlow's default allocator maps each large buffer afresh,
    except in builds whose oneDNN allocator pools by itself (seen on CPUs with
    AVX-512), so those cases check agreement with the page faults, not a fixed answer.
    """
    if order == "import-only":
        returncode, out, err = request.getfixturevalue("import_only_child")
    else:
        returncode, out, err = run_tensorflow_child(POOL_CHECK, order, allocator=setting)
        assert returncode == 0, err[-3000:]
    lines = [line.split()[1:] for line in out.splitlines() if line.startswith("pool ")]
    assert len(lines) == 1, (out, err[-3000:])
    imported, after, asked, warned, reported, reused = lines[0]
    assert imported == str(setting) and after == str(variable)
    assert reported == reused
    if pooled is not None:
        assert reported == str(pooled)
    if order == "tensor-first":  # it says what TensorFlow does, and warns if it does not pool
        assert asked == reported and warned == ("0" if reported == "True" else "1")
    else:
        assert asked == answer and warned == "0"


def test_new_shapes_and_programs_log_no_retracing_warning():
    """A new input shape is a new program by design (layers choose kernels from static
    shapes), so TensorFlow's "frequent retracing" warning must not reach users: neither
    for one compiled function called with many shapes (the decoder, per image size) nor
    for many programs compiled from one Python function (the sampler, per configuration),
    whose retracing statistics TensorFlow pools by the function's code."""
    import keras

    from keras_sd import backend

    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow's tf.function warning")
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    def double(x):
        return x * 2.0

    def scaling(factor):
        def scaled(x):
            return x * factor

        return scaled

    logger, handler = logging.getLogger("tensorflow"), Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        for jit in (False, True):
            program = backend.compile_function(double, jit)
            for n in range(1, 8):
                program(keras.ops.ones((n, 3)))
            for factor in range(7):
                backend.compile_function(scaling(float(factor)), jit)(keras.ops.ones((2,)))
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "retracing" in m], messages
