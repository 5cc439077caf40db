"""XLA's compiled programs kept on disk between processes."""

from __future__ import annotations

import hashlib
import os
import platform
import warnings

import keras

from keras_sd.backend import devices

COMPILE_CACHE_VARIABLE = "KERAS_SD_COMPILE_CACHE"
_TF_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def _machine_fingerprint() -> str:
    """A short hash of what compiled code depends on besides the program: the CPU
    (model name and instruction flags) and the NVIDIA GPUs' models, read from files,
    without initializing any backend."""
    parts = [platform.machine()]
    cpuinfo = devices._cpuinfo()
    if cpuinfo is None:
        parts.append(platform.processor())
    else:
        parts += [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.split("\n\n")[0].splitlines()
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")
        ]
    gpus = "/proc/driver/nvidia/gpus"
    if os.path.isdir(gpus):
        for bus in sorted(os.listdir(gpus)):
            try:
                with open(os.path.join(gpus, bus, "information"), encoding="utf-8") as f:
                    parts += [line for line in f if line.startswith("Model:")]
            except OSError:
                pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def default_compile_cache_dir() -> str:
    """Where `enable_compile_cache` keeps compiled programs by default.

    `$KERAS_SD_COMPILE_CACHE` if set, else
    `$XDG_CACHE_HOME/keras-sd/xla/<backend>-<its version>-<machine hash>` (XDG_CACHE_HOME
    defaults to ~/.cache). The backend's version and a hash of this machine's CPU and
    GPU models are part of the path, so a home folder shared between different machines
    or versions never hands one of them another's compiled code.

    Example:
    >>> path = default_compile_cache_dir()
    >>> path == os.environ.get(COMPILE_CACHE_VARIABLE, path)  # the variable, where set, wins
    True
    >>> os.path.isabs(path)
    True
    """
    if os.environ.get(COMPILE_CACHE_VARIABLE):
        return os.environ[COMPILE_CACHE_VARIABLE]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jaxlib", "torch": "torch"}.get(name)
    try:
        from importlib.metadata import version

        backend_version = version(module) if module else "none"
    except Exception:  # not installed as a distribution
        backend_version = "unknown"
    tag = f"{name}-{backend_version}-{_machine_fingerprint()}"
    return os.path.join(root, "keras-sd", "xla", tag)


def enable_compile_cache(directory=None) -> str | None:
    """Keep compiled XLA programs on disk, so later processes load them instead of
    compiling again.

    The first `text_to_image` of a process compiles the sampling loop, the text encoder
    and the decoder, most of its time (benchmarks/RESULTS.md). With this cache a new
    process with the same model, sizes and settings skips XLA's compilation (tracing
    still runs). The `keras-sd` command enables it by default; in a script, call this
    right after `import keras_sd`.

    TensorFlow reads its XLA flags when it makes its first tensor, so there this must
    run before anything creates one (it warns and returns None otherwise); a cache
    folder the user gave in `TF_XLA_FLAGS` is kept. JAX takes it before its first
    compilation (programs that compile in under a second are not stored; see
    `jax_persistent_cache_min_compile_time_secs`). PyTorch runs eagerly: nothing to do.

    Args:
        directory: the folder (created if missing); default `default_compile_cache_dir()`.

    Returns:
        The folder in use, or None where no cache was enabled.

    Example:
    >>> import keras_sd, tempfile
    >>> folder = keras_sd.backend.enable_compile_cache(tempfile.mkdtemp())  # doctest: +SKIP
    >>> sd = keras_sd.StableDiffusion.from_preset("sd-v1-5")  # doctest: +SKIP
    """
    name = keras.backend.backend()
    if name not in ("tensorflow", "jax"):
        return None
    directory = os.path.abspath(os.fspath(directory or default_compile_cache_dir()))
    if name == "jax":
        import jax

        os.makedirs(directory, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", directory)
        return directory
    flags = os.environ.get("TF_XLA_FLAGS", "")
    for flag in flags.split():
        if flag.startswith(_TF_CACHE_FLAG + "="):
            return flag.split("=", 1)[1]  # the user's own choice
    if devices._tensorflow_started():
        warnings.warn(
            "enable_compile_cache: TensorFlow has already made a tensor and read its XLA "
            "flags, so compiled programs will not be cached in this process; call it "
            "right after `import keras_sd`, before building a model",
            stacklevel=2,
        )
        return None
    os.makedirs(directory, exist_ok=True)
    os.environ["TF_XLA_FLAGS"] = f"{flags} {_TF_CACHE_FLAG}={directory}".strip()
    return directory
