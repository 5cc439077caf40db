"""The one place that knows how each Keras backend compiles a function.

Keras 3 has no public "compile this Python function" API, and the best choice
differs per backend: TensorFlow can run a graph with or without XLA, JAX only
runs fast under `jax.jit`, and PyTorch runs eagerly (compiled with
`torch.compile` only on request, since its first call takes minutes on CPU).
Functions compiled here are pure: model weights come in as arguments
(`Model.stateless_call`), so JAX does not bake gigabytes of constants into the
program and every backend caches one program per input shape.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import threading
import warnings

import keras

JIT_CHOICES = (True, False, "auto")


def validate_jit_compile(jit_compile) -> None:
    if jit_compile not in JIT_CHOICES or not isinstance(jit_compile, (bool, str)):
        raise ValueError(
            f"jit_compile must be one of True, False or 'auto'; received {jit_compile!r}."
        )


# "auto" on a CPU (TensorFlow): XLA in float32 for models at least this large. Measured
# on 2-core CPUs (benchmarks/RESULTS.md): a full SD 1.5 UNet step runs 20-27% faster
# under XLA than as a plain graph and the VAE decoder ~20% faster, for 8-15 s more
# compile time on the first call; the bundled ~20M-parameter model gains 0.6 s per image
# but compiles 5 s longer, which a one-off `keras-sd generate` would pay. In low
# precision the answer depends on the CPU: with native bfloat16 instructions (AVX-512
# BF16) XLA was slower than the plain graph (issue 6); without them (an AVX2 CPU) the
# graph was slower: the SD 1.5 UNet call 1.25x and the 256 px image 1.22x in bfloat16
# (float16 was measured only with Keras' einsum attention, before `dot_product_attention`
# replaced it on TensorFlow: the UNet call 1.3x slower as a graph).
XLA_CPU_MIN_PARAMS = 100_000_000

# /proc/cpuinfo flags (x86) and features (Arm) of instructions that compute a dtype.
_NATIVE_CPU_FLAGS = {
    "bfloat16": {"avx512_bf16", "amx_bf16", "bf16"},
    "float16": {"avx512_fp16", "amx_fp16"},
}


def resolve_jit_compile(jit_compile, compute_dtype=None, params=None) -> bool:
    """What `jit_compile` means on this backend and device: True for XLA (TensorFlow),
    `jax.jit` (JAX) or `torch.compile` (PyTorch), False for a plain TensorFlow graph or
    eager PyTorch.

    "auto" is XLA on GPUs. On CPUs it is XLA for models of at least
    `XLA_CPU_MIN_PARAMS` parameters, except in a low precision the CPU computes
    natively (`cpu_native_dtypes`), where TensorFlow's plain graph was measured faster;
    smaller models get the plain graph (compiling would cost more than it saves).
    PyTorch stays eager (its compiler takes minutes on CPU) and JAX is always jitted.

    Args:
        jit_compile: True, False or "auto".
        compute_dtype: the model's compute dtype; default the global Keras policy's.
        params: the model's parameter count; None counts as large.

    Example:
    >>> resolve_jit_compile(False)
    False
    >>> always = keras.backend.backend() == "jax" or has_accelerator()
    >>> resolve_jit_compile("auto", "float32", params=1000) == always
    True
    """
    validate_jit_compile(jit_compile)
    name = keras.backend.backend()
    if name == "jax":
        return True
    if jit_compile != "auto":
        return jit_compile
    if name != "tensorflow":
        return False
    if has_accelerator():
        return True
    dtype = compute_dtype or keras.config.dtype_policy().compute_dtype
    if params is not None and params < XLA_CPU_MIN_PARAMS:
        return False
    return dtype not in cpu_native_dtypes()


def cpu_native_dtypes(cpuinfo: str | None = None) -> frozenset:
    """The low-precision dtypes ("bfloat16", "float16") this CPU has arithmetic for.

    Without such instructions (most CPUs before AVX-512 BF16/FP16 or AMX) a backend
    emulates them: on such a CPU TensorFlow's plain graph ran the SD 1.5 UNet 1.25x
    slower than XLA in bfloat16, where XLA ran at about float32 speed
    (benchmarks/RESULTS.md).

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


@functools.cache
def softmax_computes_in_float32(dtype) -> bool:
    """Whether TensorFlow's softmax of a `dtype` tensor, on the default device and in a
    graph, gives exactly the float32 softmax of the same values rounded to `dtype`.

    Then attention can hand the kernel its low-precision logits directly: its
    arithmetic (max, exponentials, sum) is already float32, and the float32 copy of
    the logits and the cast back are two passes over the largest tensor of SD's
    attention that buy nothing. Measured, not assumed: oneDNN's CPU softmax computes
    bfloat16 in float32 (bit-identical); TensorFlow's own Eigen kernel (oneDNN off)
    and float16 on this CPU round in between and differ. float32 itself: True.
    Other backends: False (their attention is `keras.ops.dot_product_attention`).

    Example:
    >>> softmax_computes_in_float32("float32")
    True
    """
    dtype = keras.backend.standardize_dtype(dtype)
    if dtype == "float32":
        return True
    if keras.backend.backend() != "tensorflow":
        return False
    import numpy as np
    import tensorflow as tf

    # Random rows (as SD's logits) and a uniform 4096-wide row, whose sum a kernel
    # accumulating in low precision gets visibly wrong.
    values = np.random.default_rng(0).standard_normal((8, 4096)).astype("float32") * 4
    values[0] = 0.0

    @tf.function(jit_compile=False)
    def same(x):
        low = tf.nn.softmax(x, axis=-1)
        high = tf.cast(tf.nn.softmax(tf.cast(x, tf.float32), axis=-1), x.dtype)
        return tf.reduce_all(tf.equal(low, high))

    with tf.init_scope():  # runs eagerly even when asked while a graph is traced
        try:
            return bool(same(tf.constant(values, dtype)))
        except (tf.errors.OpError, TypeError):  # no kernel for this dtype
            return False


def fused_group_norm_applies(x) -> bool:
    """Whether `fused_group_norm` can normalize `x` here: TensorFlow, a CPU, outside
    XLA (which fuses the plain formulation itself), and a 4-D tensor of static shape.

    Example:
    >>> here = keras.backend.backend() == "tensorflow" and not has_accelerator()
    >>> fused_group_norm_applies(keras.ops.ones((1, 4, 4, 8))) == here
    True
    """
    if keras.backend.backend() != "tensorflow" or tracing_for_xla() or has_accelerator():
        return False
    import tensorflow as tf

    return isinstance(x, tf.Tensor) and x.shape.rank == 4 and x.shape.is_fully_defined()


def fused_group_norm(x, groups: int, weight, bias, epsilon: float, reference):
    """Group normalization of a channels-last TensorFlow tensor through the fused
    batch-norm kernel (oneDNN's on x86 CPUs): one pass for per-channel statistics and
    one for the normalization and affine map, both with float32 arithmetic on
    float32/bfloat16/float16 data, instead of the seven full-size passes of the plain
    formulation (cast, moments, scale, shift, cast back). A 512x512x128 VAE GroupNorm
    took 0.04 s against 0.29 s in bfloat16 on a 2-core AVX-512 BF16 CPU (0.05 against
    0.28 s in float32), with errors against float64 no larger.

    Group statistics come from the per-channel ones by the law of total variance (no
    E[x^2] - E[x]^2 cancellation). Samples of a batch are normalized one at a time,
    since the kernel pools statistics over the batch. The kernel's gradient ignores
    its statistics outputs, so gradients are those of `reference(x, weight, bias)`,
    the plain formulation, recomputed.

    Args:
        x: `[B, H, W, C]` of static shape (`fused_group_norm_applies`).
        groups: channel groups; must divide C.
        weight, bias: `[C]` affine parameters (any float dtype; used in float32).
        epsilon: added to the variance.
        reference: differentiable `(x, weight, bias) -> y` with the same result.

    Example:
    >>> import tensorflow as tf
    >>> x = tf.reshape(tf.range(32.0), (1, 2, 2, 8))
    >>> y = fused_group_norm(x, 2, tf.ones(8), tf.zeros(8), 1e-5, None)
    >>> [round(float(m), 3) for m in tf.nn.moments(y, axes=(0, 1, 2, 3))]
    [0.0, 1.0]
    """
    import tensorflow as tf

    batch, height, width, channels = x.shape
    per_group, count = channels // groups, height * width

    def statistics(sample):
        _, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
            x=sample,
            scale=tf.ones([channels]),
            offset=tf.zeros([channels]),
            mean=tf.zeros([0]),
            variance=tf.zeros([0]),
            epsilon=epsilon,
            is_training=True,
        )
        var = var * ((count - 1) / count)  # the kernel reports the unbiased variance
        mean, var = tf.reshape(mean, (groups, per_group)), tf.reshape(var, (groups, per_group))
        group_mean = tf.reduce_mean(mean, axis=1, keepdims=True)
        group_var = tf.reduce_mean(var + tf.square(mean - group_mean), axis=1, keepdims=True)
        return (
            tf.reshape(tf.broadcast_to(group_mean, (groups, per_group)), [channels]),
            tf.reshape(tf.broadcast_to(group_var, (groups, per_group)), [channels]),
        )

    @tf.custom_gradient
    def normalize(x, weight, bias):
        scale, offset = tf.cast(weight, tf.float32), tf.cast(bias, tf.float32)
        outputs = []
        for sample in tf.split(x, batch) if batch > 1 else [x]:
            mean, var = statistics(sample)
            y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=sample,
                scale=scale,
                offset=offset,
                mean=mean,
                variance=var,
                epsilon=epsilon,
                is_training=False,
            )
            outputs.append(y)

        def gradient(dy):
            with tf.GradientTape() as tape:
                tape.watch([x, weight, bias])
                y = reference(x, weight, bias)
            return tape.gradient(y, [x, weight, bias], output_gradients=dy)

        return (outputs[0] if batch == 1 else tf.concat(outputs, 0)), gradient

    return normalize(x, tf.convert_to_tensor(weight), tf.convert_to_tensor(bias))


def host_memory_pooled() -> bool | None:
    """Whether TensorFlow's CPU allocator pools freed memory (see `keras_sd._host_memory`);
    None on other backends.

    False means TensorFlow made its first tensor before `keras_sd` was imported (or
    `TF_CPU_ALLOCATOR_USE_BFC` was set to false): large CPU buffers are then mapped
    afresh on every call, which was ~2x slower for 512 px attention on the CPUs
    measured. Only the pooling allocator keeps statistics, which is how this tells.

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


COMPILE_CACHE_VARIABLE = "KERAS_SD_COMPILE_CACHE"
_TF_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def _machine_fingerprint() -> str:
    """A short hash of what compiled code depends on besides the program: the CPU
    (model name and instruction flags) and the NVIDIA GPUs' models, read from files,
    without initializing any backend."""
    parts = [platform.machine()]
    cpuinfo = _cpuinfo()
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
    >>> default_compile_cache_dir().split(os.sep)[-3:-1]
    ['keras-sd', 'xla']
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


def _tensorflow_started() -> bool:
    from tensorflow.python.eager import context  # imported by Keras already

    return getattr(context.context(), "_context_handle", None) is not None


def enable_compile_cache(directory=None) -> str | None:
    """Keep compiled XLA programs on disk, so later processes load them instead of
    compiling again.

    The first `text_to_image` of a process compiles the sampling loop, the text encoder
    and the decoder (measured in benchmarks/RESULTS.md: tens of seconds on a CPU, 25 s
    on a GPU). With this cache a new process with the same model, sizes and settings
    skips XLA's compilation (tracing still runs). The `keras-sd` command enables it by
    default; in a script, call this right after `import keras_sd`.

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
    if _tensorflow_started():
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


# Bytes: where memory a backend adopts must start (`borrow_numpy`, `adopt_numpy`); Eigen's
# EIGEN_MAX_ALIGN_BYTES on AVX-512 builds.
HOST_ALIGNMENT = 64


def borrow_numpy(array):
    """A tensor that shares `array`'s memory (no copy), or None where that is not safe.

    Only TensorFlow on CPU (through DLPack); on GPUs the host-to-device copy may still
    be queued when the call returns, and the other backends copy anyway. TensorFlow's
    kernels assume buffers aligned to 64 bytes (an unaligned one aborts the process),
    so only C-contiguous arrays starting on such a boundary are shared;
    `keras_sd.weights.streaming.aligned_empty` makes them.

    The memory must stay valid and unchanged for as long as the result, or anything
    made from it without a copy, is in use: a TensorFlow variable created from the
    result adopts the memory itself (keras-layout checkpoints rely on this to map a
    file into variables), while an op's output (a transpose) is new memory, after which
    `array` may be reused.

    Example:
    >>> from keras_sd.weights.streaming import aligned_empty
    >>> array = aligned_empty((2, 3), "float32")
    >>> array[:] = [[0, 1, 2], [3, 4, 5]]
    >>> t = borrow_numpy(array)
    >>> expected = [[0, 3], [1, 4], [2, 5]]
    >>> t is None or keras.ops.convert_to_numpy(keras.ops.transpose(t)).tolist() == expected
    True
    """
    if keras.backend.backend() != "tensorflow" or has_accelerator():
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
    >>> from keras_sd.weights.streaming import aligned_empty
    >>> array = aligned_empty((4,), "float32")
    >>> array[:] = 1.0
    >>> t = adopt_numpy(array)
    >>> t is None or keras.ops.convert_to_numpy(t).tolist() == [1.0, 1.0, 1.0, 1.0]
    True
    """
    tensor = borrow_numpy(array)
    if tensor is not None or keras.backend.backend() != "jax" or has_accelerator():
        return tensor
    import jax

    tensor = jax.device_put(array)  # (jnp.asarray copies)
    return tensor if tensor.unsafe_buffer_pointer() == array.ctypes.data else None


def compile_function(fn, jit_compile=True):
    """Compile a pure function of arrays for the current backend.

    Args:
        fn: a function whose arguments and results are (nested) arrays.
        jit_compile: True for XLA, False for the backend's plain graph mode
            (TensorFlow) or eager execution (PyTorch), "auto" as `resolve_jit_compile`
            decides for a large float32 model (callers that know their model resolve
            it first). JAX always uses `jax.jit`, its only fast mode.

    Returns:
        A callable with the same signature; it retraces only for new shapes/dtypes.

    Example:
    >>> import keras
    >>> f = compile_function(lambda x: keras.ops.sin(x) * 2.0, jit_compile=False)
    >>> float(f(keras.ops.zeros(()))) == 0.0
    True
    """
    validate_jit_compile(jit_compile)
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        xla = resolve_jit_compile(jit_compile)
        return tf.function(_traced_for_xla(fn) if xla else fn, jit_compile=xla)
    if name == "jax":
        import jax

        return jax.jit(_traced_for_xla(fn))
    if name == "torch":
        import torch

        if jit_compile is True:
            return torch.compile(fn)
        return torch.no_grad()(fn)
    return fn


_xla_trace = threading.local()


def tracing_for_xla() -> bool:
    """Whether the code running now is being traced into an XLA program by
    `compile_function` (TensorFlow with XLA, or JAX).

    Layers read this at trace time to pick formulations that only pay once XLA fuses
    their elementwise work (see `keras_sd.models.layers.Conv3x3`).

    Example:
    >>> tracing_for_xla()
    False
    """
    return getattr(_xla_trace, "depth", 0) > 0


def _traced_for_xla(fn):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        _xla_trace.depth = getattr(_xla_trace, "depth", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _xla_trace.depth -= 1

    return traced


def model_state(model):
    """The current variable values of `model`, in `stateless_call` order."""
    return (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
    )


def stateless(model):
    """Return `call(state, *args)`: `model(*args)` with weights given by `state`."""

    def call(state, *args):
        trainable, non_trainable = state
        outputs, _ = model.stateless_call(trainable, non_trainable, *args)
        return outputs

    return call


def supports_step_callback(jit_compile) -> bool:
    """Whether `step_callback` works inside a program compiled with `jit_compile`.

    TensorFlow cannot call Python from inside XLA; its plain graphs, `jax.jit`
    and eager PyTorch can.
    """
    return not (keras.backend.backend() == "tensorflow" and resolve_jit_compile(jit_compile))


def step_callback(fn, step, after) -> None:
    """Call `fn(int(step))` on the host from inside a compiled loop (for progress bars).

    `after` is a tensor the call waits for (a slice of the step's result), so the
    host hears of a step only once it is computed.
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        tf.py_function(lambda s, _: fn(int(s)), [step, after], Tout=[])
    elif name == "jax":
        import jax

        jax.debug.callback(lambda s, _: fn(int(s)), step, after)
    else:
        fn(int(step))


def no_grad():
    """Context that disables gradient tracking where the backend tracks it eagerly."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
