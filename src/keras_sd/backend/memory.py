"""Host memory shared with a backend without a copy, and TensorFlow's pooling of it."""

from __future__ import annotations

import math
import os
import warnings

import keras
import numpy as np

from keras_sd.backend import devices

# Bytes: where memory a backend adopts must start (`borrow_numpy`, `adopt_numpy`); Eigen's
# EIGEN_MAX_ALIGN_BYTES on AVX-512 builds.
HOST_ALIGNMENT = 64


def aligned_empty(shape, dtype, alignment: int = HOST_ALIGNMENT) -> np.ndarray:
    """An uninitialized C-contiguous array whose data start on an `alignment`-byte boundary.

    Eigen's vectorized kernels (TensorFlow's) assume 64-byte alignment for arrays handed
    over without a copy; numpy itself guarantees only 16 bytes.

    Example:
    >>> aligned_empty((3, 5), "float32").ctypes.data % 64
    0
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def borrow_numpy(array):
    """A tensor that shares `array`'s memory (no copy), or None where that is not safe.

    Only TensorFlow on CPU (through DLPack); on GPUs the host-to-device copy may still
    be queued when the call returns, and the other backends copy anyway. TensorFlow's
    kernels assume buffers aligned to 64 bytes (an unaligned one aborts the process),
    so only C-contiguous arrays starting on such a boundary are shared;
    `aligned_empty` makes them.

    The memory must stay valid and unchanged for as long as the result, or anything
    made from it without a copy, is in use: a TensorFlow variable created from the
    result adopts the memory itself (keras-layout checkpoints rely on this to map a
    file into variables), while an op's output (a transpose) is new memory, after which
    `array` may be reused.

    Example:
    >>> array = aligned_empty((2, 3), "float32")
    >>> array[:] = [[0, 1, 2], [3, 4, 5]]
    >>> t = borrow_numpy(array)
    >>> expected = [[0, 3], [1, 4], [2, 5]]
    >>> t is None or keras.ops.convert_to_numpy(keras.ops.transpose(t)).tolist() == expected
    True
    """
    if keras.backend.backend() != "tensorflow" or devices.has_accelerator():
        return None
    if not array.flags.c_contiguous or array.ctypes.data % HOST_ALIGNMENT:
        return None
    import tensorflow as tf

    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def adopt_numpy(array):
    """A tensor made from `array` that keeps using its memory, or None where the backend
    would copy it. `array` must not change afterwards.

    TensorFlow on CPU adopts it through DLPack (`borrow_numpy`); JAX's `device_put` on
    CPU takes a 64-byte-aligned host array without a copy, which is checked here (the
    result's buffer must be `array`'s). For memory that outlives the tensor (a
    variable's values), unlike `borrow_numpy`'s scratch use: JAX computes asynchronously,
    so an array it shares must never be reused.

    Example:
    >>> array = aligned_empty((4,), "float32")
    >>> array[:] = 1.0
    >>> t = adopt_numpy(array)
    >>> t is None or keras.ops.convert_to_numpy(t).tolist() == [1.0, 1.0, 1.0, 1.0]
    True
    """
    tensor = borrow_numpy(array)
    if tensor is not None or keras.backend.backend() != "jax" or devices.has_accelerator():
        return tensor
    import jax

    tensor = jax.device_put(array)  # (jnp.asarray copies)
    return tensor if tensor.unsafe_buffer_pointer() == array.ctypes.data else None


POOL_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"


def use_pooled_host_memory() -> bool:
    """Ask TensorFlow to keep freed host memory for its next buffers (its best-fit
    pooling CPU allocator, `TF_CPU_ALLOCATOR_USE_BFC=true`).

    TensorFlow's default CPU allocator hands each large buffer back to the operating
    system when it is freed, so every UNet call maps its activations (the attention
    scores above all) as new memory and pays a page fault per page; pooling avoids
    that, which makes large images faster on CPUs (benchmarks/RESULTS.md). It is a
    process-wide setting, so `import keras_sd` never makes it: the `keras-sd` command
    does, and a script can call this (or set the variable itself).

    TensorFlow reads the variable once, when it makes its first tensor, so call this
    right after `import keras_sd`, before building a model; later it warns and changes
    nothing. A value already set (`TF_CPU_ALLOCATOR_USE_BFC=false`) is kept. Other
    backends ignore the variable: nothing to do there.

    Returns:
        Whether TensorFlow will pool (or, when it had started already, pools) host
        memory; False on other backends.

    Example:
    >>> import keras_sd
    >>> keras_sd.backend.use_pooled_host_memory()  # doctest: +SKIP
    True
    """
    if keras.backend.backend() != "tensorflow":
        return False
    if devices._tensorflow_started():
        pooled = host_memory_pooled()
        if not pooled:
            warnings.warn(
                "use_pooled_host_memory: TensorFlow has already made a tensor and chosen "
                "its CPU allocator, so host memory is not pooled in this process; call it "
                "right after `import keras_sd`, before building a model",
                stacklevel=2,
            )
        return pooled
    os.environ.setdefault(POOL_VARIABLE, "true")
    return os.environ[POOL_VARIABLE].strip().lower() in ("true", "1")


def host_memory_pooled() -> bool | None:
    """Whether TensorFlow's CPU allocator pools freed memory (`use_pooled_host_memory`);
    None on other backends.

    False means pooling was not requested before TensorFlow made its first tensor (or
    `TF_CPU_ALLOCATOR_USE_BFC` was set to false): large CPU buffers are then mapped
    afresh on every call. Only the pooling allocator keeps statistics, which is how
    this tells; asking starts TensorFlow, so ask after `use_pooled_host_memory`.

    Example:
    >>> host_memory_pooled() in (True, False, None)
    True
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return False
    return True
