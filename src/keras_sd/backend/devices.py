"""What computes here: whether the backend has an accelerator, and which low-precision
dtypes this CPU has instructions for."""

from __future__ import annotations

import functools

import keras

# /proc/cpuinfo flags (x86) and features (Arm) of instructions that compute a dtype.
_NATIVE_CPU_FLAGS = {
    "bfloat16": {"avx512_bf16", "amx_bf16", "bf16"},
    "float16": {"avx512_fp16", "amx_fp16"},
}


def cpu_native_dtypes(cpuinfo: str | None = None) -> frozenset:
    """The low-precision dtypes ("bfloat16", "float16") this CPU has arithmetic for.

    Without such instructions (most CPUs before AVX-512 BF16/FP16 or AMX) a backend
    emulates them, which XLA does faster than TensorFlow's plain graph
    (`resolve_jit_compile`).

    Args:
        cpuinfo: the text of `/proc/cpuinfo`; default: read it (Linux). Where it cannot
            be read the answer is an empty set.

    Example:
    >>> sorted(cpu_native_dtypes("flags : fpu sse2 avx2 avx512f avx512_bf16"))
    ['bfloat16']
    >>> cpu_native_dtypes("flags : fpu sse2 avx2 fma")
    frozenset()
    """
    if cpuinfo is None:
        return _this_cpu_native_dtypes()
    flags = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(d for d, names in _NATIVE_CPU_FLAGS.items() if flags & names)


@functools.cache
def _cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, read once; None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _this_cpu_native_dtypes() -> frozenset:
    cpuinfo = _cpuinfo()
    return frozenset() if cpuinfo is None else cpu_native_dtypes(cpuinfo)


def has_accelerator() -> bool:
    """Whether the current backend computes on a GPU (or another accelerator).

    Example:
    >>> isinstance(has_accelerator(), bool)
    True
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if name == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if name == "torch":
        import torch

        return torch.cuda.is_available()
    return False


def _tensorflow_started() -> bool:
    """Whether TensorFlow has made its first tensor (and so read its environment
    variables: XLA flags, the CPU allocator)."""
    from tensorflow.python.eager import context  # imported by Keras already

    return getattr(context.context(), "_context_handle", None) is not None
