"""`keras_sd.backend.enable_compile_cache` and the `keras-sd` command's use of it:
compiled XLA programs are written to disk by a first process and loaded, not
compiled, by the next one, which generates the same image."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import COMPILE_CACHE_VARIABLES, SESSION_COMPILE_CACHE, tensorflow_compile_cache
from keras_sd import backend

# TensorFlow's persistent-cache log line for a program loaded from disk (seen with
# TF_CPP_VMODULE=device_executable_persistor=3).
TF_LOADED = "Loading cached entry"


def run(argv, env_extra=None, timeout=600):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    for name in COMPILE_CACHE_VARIABLES:  # the session's shared cache: these count their own
        env.pop(name, None)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def generate(tmp_path, name, *extra, env_extra=None):
    out = tmp_path / f"{name}.png"
    argv = [sys.executable, "-m", "keras_sd.cli", "generate", "a red circle", "-o", str(out)]
    argv += ["--steps", "1", "--seed", "5", "--jit-compile", "true", *extra]
    argv += ["--width", "32", "--height", "32"]  # the smallest programs tiny-shapes makes
    result = run(argv, {"KERAS_BACKEND": "tensorflow", **(env_extra or {})})
    from PIL import Image

    return np.asarray(Image.open(out)), result.stderr


def test_cli_reuses_compiled_programs_from_its_cache(tmp_path):
    """The first run stores its XLA programs; the second loads every one of them (the
    log says so) instead of compiling, writes no new ones, and makes the same image."""
    cache = tmp_path / "cache"
    verbose = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "device_executable_persistor=3"}
    first, log = generate(tmp_path, "first", "--compile-cache", str(cache), env_extra=verbose)
    stored = sorted(os.listdir(cache))
    assert stored, "no compiled program was written to the cache"
    assert TF_LOADED not in log
    second, log = generate(tmp_path, "second", "--compile-cache", str(cache), env_extra=verbose)
    assert log.count(TF_LOADED) >= len(stored), log[-3000:]
    assert sorted(os.listdir(cache)) == stored
    np.testing.assert_array_equal(first, second)


def test_cli_without_compile_cache_stores_nothing(tmp_path):
    """`--no-compile-cache` leaves the default folder ($XDG_CACHE_HOME) untouched."""
    home = tmp_path / "xdg"
    generate(tmp_path, "plain", "--no-compile-cache", env_extra={"XDG_CACHE_HOME": str(home)})
    assert not home.exists() or not any(home.rglob("*xla_compile_cache*"))


JAX_CHILD = """
import sys, jax, keras_sd
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
print("dir", keras_sd.backend.enable_compile_cache(sys.argv[1]))
# Stored weights, the same in both processes, loaded without running initializers: every
# program compiled (and counted as a cache hit) is the pipeline's own.
sd = keras_sd.StableDiffusion.from_preset("tiny-shapes", jit_compile=True)
image = sd.text_to_image("a red circle", num_steps=1, seed=5, progress=False)
print("hits", hits.count("/jax/compilation_cache/cache_hits"))
print("sum", int(image.astype("int64").sum()))
"""


def test_jax_reuses_compiled_programs_from_the_cache(tmp_path):
    cache = str(tmp_path / "jax-cache")
    env = {"KERAS_BACKEND": "jax", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    outputs = []
    for _ in range(2):
        lines = run([sys.executable, "-c", JAX_CHILD, cache], env).stdout.splitlines()
        outputs.append(
            dict(line.split(" ", 1) for line in lines if line[:4] in ("dir ", "hits", "sum "))
        )
    assert outputs[0]["dir"] == cache and os.listdir(cache)
    assert outputs[0]["hits"] == "0" and int(outputs[1]["hits"]) > 0
    assert outputs[0]["sum"] == outputs[1]["sum"]


def test_torch_has_nothing_to_cache(tmp_path):
    script = "import sys, keras_sd; print(keras_sd.backend.enable_compile_cache(sys.argv[1]))"
    out = run([sys.executable, "-c", script, str(tmp_path / "c")], {"KERAS_BACKEND": "torch"})
    assert out.stdout.split()[-1] == "None"
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's flags")
def test_tensorflow_too_late_warns_and_keeps_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
    keras.ops.ones((1,))  # TensorFlow has read its XLA flags by now
    with pytest.warns(UserWarning, match="call it right after `import keras_sd`"):
        assert backend.enable_compile_cache(tmp_path / "late") is None
    assert "TF_XLA_FLAGS" not in os.environ
    assert not (tmp_path / "late").exists()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's flags")
def test_tensorflow_keeps_the_users_cache_folder(tmp_path, monkeypatch):
    flags = f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={tmp_path}/mine"
    monkeypatch.setenv("TF_XLA_FLAGS", flags)
    assert backend.enable_compile_cache(tmp_path / "other") == f"{tmp_path}/mine"
    assert os.environ["TF_XLA_FLAGS"] == flags


def test_default_folder_names_backend_version_and_machine(tmp_path, monkeypatch):
    monkeypatch.delenv(backend.COMPILE_CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = backend.default_compile_cache_dir()
    parent, tag = os.path.split(folder)
    assert parent == str(tmp_path / "keras-sd" / "xla")
    name, version, machine = tag.rsplit("-", 2)
    assert name == keras.backend.backend() and version and len(machine) == 12
    monkeypatch.setenv(backend.COMPILE_CACHE_VARIABLE, str(tmp_path / "chosen"))
    assert backend.default_compile_cache_dir() == str(tmp_path / "chosen")


def test_the_test_session_shares_one_fresh_cache_folder():
    """tests/conftest.py hands every worker and child process of a test session one
    compile cache folder of its own (not the user's ~/.cache), with a TensorFlow folder
    per xdist worker inside it."""
    folder = os.environ[SESSION_COMPILE_CACHE]
    assert os.path.isdir(folder) and not folder.startswith(os.path.expanduser("~/.cache"))
    tf_folder = tensorflow_compile_cache()
    assert os.path.dirname(tf_folder) == folder
    assert tf_folder.endswith(os.environ.get("PYTEST_XDIST_WORKER", "main"))
    flags = [f for f in os.environ["TF_XLA_FLAGS"].split() if "persistent_cache_dir" in f]
    assert flags == [f"--tf_xla_persistent_cache_directory={tf_folder}"]
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == folder
    assert backend.default_compile_cache_dir() == folder
