"""One JAX child process for the whole test session, shared by the test files that
repeat their checks on JAX.

A Keras process has one backend, so the JAX checks run in a child. Starting one
(JAX, keras-sd, and for the diffusers comparison torch and diffusers) costs seconds
each time, and JAX's eager primitives compile once a process, so the checks of
test_backends, test_protocol, test_construction and test_textual_inversion run in
one child: the session fixture `jax_results` runs every task and each test asserts
its own values from `task_result(jax_results, name)`. The tests that use it share
the xdist group JAX_GROUP, so one worker runs the child once.

The tasks' random tiny models come from `random_tiny_sd` (numpy draws instead of
Keras' initializers, which on JAX compile a program per weight shape).

Run as a script (`python backend_children.py TASK...`) it runs the named tasks on
the backend in KERAS_BACKEND and prints {task: {"result": ...} or {"error": ...}}
as JSON on its last line.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import traceback

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
JAX_GROUP = "jax-child"  # the xdist group of the tests that read the JAX child's results
JAX_ENV = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}

# tests/test_construction.py tests repeated on JAX: its gather clamps an out-of-range
# token id instead of raising, and a stale compiled program would keep a replaced part.
CONSTRUCTION_TESTS = (
    "test_assigned_unet_is_used_on_the_next_call",
    "test_assigned_encoder_or_decoder_is_used_on_the_next_call",
    "test_assigned_scheduler_is_used_on_the_next_call",
    "test_added_token_without_embedding_row_is_refused",
)


def _load(relative_path: str):
    """Import a test module by path under a name of its own (test files share no package)."""
    path = os.path.join(TESTS, relative_path)
    name = "child_" + relative_path.replace(os.sep, "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initializer_draw(variable, rng):
    """A numpy draw from the distribution of `variable`'s Keras initializer.

    On JAX each initializer compiles a random program per weight shape, which costs
    more than a tiny model's whole use; numpy draws the same distributions for free.
    """
    import keras
    import numpy as np
    from keras.src.initializers.random_initializers import compute_fans

    init, shape = variable._initializer, tuple(variable.shape)
    if isinstance(init, keras.initializers.Zeros):
        value = np.zeros(shape)
    elif isinstance(init, keras.initializers.Ones):
        value = np.ones(shape)
    elif isinstance(init, keras.initializers.RandomUniform):
        value = rng.uniform(init.minval, init.maxval, shape)
    elif isinstance(init, keras.initializers.VarianceScaling) and init.distribution == "uniform":
        fan_in, fan_out = compute_fans(shape, init.input_axes, init.output_axes)
        fan = {"fan_in": fan_in, "fan_out": fan_out}.get(init.mode, (fan_in + fan_out) / 2)
        limit = np.sqrt(3.0 * init.scale / max(1.0, fan))
        value = rng.uniform(-limit, limit, shape)
    else:
        raise TypeError(f"no numpy draw for {variable.path}'s {type(init).__name__}")
    return value.astype(variable.dtype)


def built_from_values(build, value) -> dict:
    """`build()`'s models (a dict) with each variable created from `value(variable)`,
    called in the order of the models' weights: Keras' initializers never run."""
    import keras

    from keras_sd.weights import deferred

    with keras.StatelessScope(initialize_variables=False):
        models = build()
    pairs = [(v, lambda v=v: value(v)) for model in models.values() for v in model.weights]
    deferred.initialize_deferred(models.values(), pairs)
    return models


def random_tiny_sd(img_height: int, img_width: int, seed: int = 0, **kwargs):
    """`StableDiffusion(img_height, img_width, config="tiny", **kwargs)` with
    `initializer_draw`'s values from a numpy generator seeded with `seed`."""
    import numpy as np

    from keras_sd import StableDiffusion
    from keras_sd.presets import resolve_model_config
    from keras_sd.weights.deferred import MODELS, build_model

    config = resolve_model_config("tiny")
    rng = np.random.default_rng(seed)
    models = built_from_values(
        lambda: {attr: build_model(attr, config) for attr in MODELS},
        lambda v: initializer_draw(v, rng),
    )
    return StableDiffusion(img_height, img_width, config="tiny", **models, **kwargs)


def _construction() -> dict:
    """The construction tests through pytest in this process: outcome per test phase."""
    outcomes = []

    class Record:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                outcomes.append([report.nodeid, report.when, report.outcome])

    options = ["-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-o", "addopts="]
    target = os.path.join(TESTS, "test_construction.py")
    status = pytest.main(
        [*options, target, "-k", " or ".join(CONSTRUCTION_TESTS)], plugins=[Record()]
    )
    return {"status": int(status), "outcomes": outcomes}


def _float16_attention() -> dict:
    """jax.jit float16 attention (plain and causal) against float64 numpy: the output
    dtype and max error per case."""
    import jax
    import numpy as np

    from keras_sd.models.attention import dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 3, 8)).astype("float16") for _ in range(3))
    errors = {}
    for causal in (False, True):
        attend = jax.jit(
            lambda q, k, v, causal=causal: dot_product_attention(q, k, v, is_causal=causal)
        )
        out = attend(q, k, v)
        x = [a.astype("float64").transpose(0, 2, 1, 3) for a in (q, k, v)]
        logits = x[0] @ x[1].transpose(0, 1, 3, 2) / np.sqrt(8)
        if causal:
            logits = np.where(np.triu(np.ones((7, 7), bool), 1), -np.inf, logits)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        ref = ((p / p.sum(-1, keepdims=True)) @ x[2]).transpose(0, 2, 1, 3)
        error = float(np.abs(np.asarray(out, "float64") - ref).max())
        errors[str(causal)] = [str(out.dtype), error]
    return errors


def _pipeline() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        return _load("test_pipeline.py").run_comparison(folder)


TASKS = {
    # pytest first: it imports tests/conftest.py before anything else has.
    "construction": _construction,
    "float16_attention": _float16_attention,
    "protocol": lambda: _load(os.path.join("schedulers", "test_protocol.py")).compare(),
    # jax.jit steps: un-jitted, JAX compiles each op of the model and its gradient apart.
    "textual_inversion": lambda: _load(
        os.path.join("training", "test_textual_inversion.py")
    ).train_and_compare("float32", jit_compile=True),
    "pipeline": _pipeline,
}


def run_tasks(names) -> dict:
    """Run each named task, seeded like a test; a task's failure is recorded, not raised."""
    import keras
    import numpy as np

    results = {}
    for name in names:
        keras.utils.set_random_seed(0)
        np.random.seed(0)
        try:
            results[name] = {"result": TASKS[name]()}
        except Exception:  # noqa: BLE001 - the test that reads this task reports it
            results[name] = {"error": traceback.format_exc()}
    return results


def run_child(env: dict, names, timeout: int = 1500) -> dict:
    """Run `names` in a fresh process with `env` added; the results by task."""
    run = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *names],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def task_result(results: dict, name: str):
    """The value task `name` returned in the child; fails with its traceback if it raised."""
    outcome = results[name]
    assert "error" not in outcome, f"{name} failed in the child:\n{outcome.get('error')}"
    return outcome["result"]


@functools.cache
def _jax_child() -> dict:
    return run_child(JAX_ENV, list(TASKS))


@pytest.fixture(scope="session")
def jax_results() -> dict:
    """Every task's result from one KERAS_BACKEND=jax child, run at first use, and the
    backend the child ran on under "backend"."""
    # Each test module that imports this fixture gets a definition of its own, so the
    # child's results are kept here, once a process.
    return _jax_child()


if __name__ == "__main__":
    import keras

    sys.path.insert(0, TESTS)
    outcome = run_tasks(sys.argv[1:])
    outcome["backend"] = keras.backend.backend()
    print(json.dumps(outcome))
