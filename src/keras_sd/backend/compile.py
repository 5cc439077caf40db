"""How each Keras backend compiles a function, and what runs inside compiled code.

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
import threading

import keras

from keras_sd.backend import devices

JIT_CHOICES = (True, False, "auto")


def validate_jit_compile(jit_compile) -> None:
    """Refuse a `jit_compile` other than True, False or "auto", naming the choices.

    Example:
    >>> validate_jit_compile("auto")
    >>> validate_jit_compile("xla")
    Traceback (most recent call last):
    ValueError: jit_compile must be one of True, False or 'auto'; received 'xla'.
    """
    if jit_compile not in JIT_CHOICES or not isinstance(jit_compile, (bool, str)):
        raise ValueError(
            f"jit_compile must be one of True, False or 'auto'; received {jit_compile!r}."
        )


# "auto" on a TensorFlow CPU: XLA's compile time pays off only for models this large;
# see benchmarks/RESULTS.md.
XLA_CPU_MIN_PARAMS = 100_000_000


def resolve_jit_compile(jit_compile, compute_dtype=None, params=None) -> bool:
    """What `jit_compile` means on this backend and device: True for XLA (TensorFlow),
    `jax.jit` (JAX) or `torch.compile` (PyTorch), False for a plain TensorFlow graph or
    eager PyTorch.

    "auto" is XLA on GPUs. On CPUs it is XLA for models of at least
    `XLA_CPU_MIN_PARAMS` parameters, except in a low precision the CPU computes
    natively (`cpu_native_dtypes`), where TensorFlow's plain graph is faster;
    smaller models get the plain graph (compiling would cost more than it saves).
    PyTorch stays eager (its compiler takes minutes on CPU) and JAX is always jitted.

    Args:
        jit_compile: True, False or "auto".
        compute_dtype: the model's compute dtype; default the global Keras policy's.
        params: the model's parameter count; None counts as large.

    Example:
    >>> resolve_jit_compile(False)
    False
    >>> always = keras.backend.backend() == "jax" or devices.has_accelerator()
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
    if devices.has_accelerator():
        return True
    dtype = compute_dtype or keras.config.dtype_policy().compute_dtype
    if params is not None and params < XLA_CPU_MIN_PARAMS:
        return False
    return dtype not in devices.cpu_native_dtypes()


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
        function = tf.function(_traced_for_xla(fn) if xla else fn, jit_compile=xla)
        # One program per input shape is the design (layers choose kernels from static
        # shapes; `reduce_retracing` would trace them with unknown sizes), so TensorFlow's
        # "frequent retracing" warning, pooled over every function with this code, would
        # only alarm users. The flag silences it for this function alone; TensorFlow sets
        # it itself on restored SavedModel functions.
        function._omit_frequent_tracing_warning = True
        return function
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
    their elementwise work (see `keras_sd.models.conv.Conv3x3`).

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
    """The current variable values of `model`, in `stateless_call` order.

    Example:
    >>> import keras
    >>> trainable, non_trainable = model_state(keras.layers.Dense(2))
    >>> len(trainable), len(non_trainable)
    (0, 0)
    """
    return (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
    )


def stateless(model):
    """Return `call(state, *args)`: `model(*args)` with weights given by `state`.

    Example:
    >>> import keras, numpy as np
    >>> dense = keras.layers.Dense(1, use_bias=False)
    >>> dense.build((None, 2))
    >>> state = ([np.array([[1.0], [2.0]], "float32")], [])
    >>> float(stateless(dense)(state, np.array([[1.0, 1.0]], "float32"))[0, 0])
    3.0
    """

    def call(state, *args):
        trainable, non_trainable = state
        outputs, _ = model.stateless_call(trainable, non_trainable, *args)
        return outputs

    return call


def supports_step_callback(jit_compile) -> bool:
    """Whether `step_callback` works inside a program compiled with `jit_compile`.

    TensorFlow cannot call Python from inside XLA; its plain graphs, `jax.jit`
    and eager PyTorch can.

    Example:
    >>> supports_step_callback(False)
    True
    """
    return not (keras.backend.backend() == "tensorflow" and resolve_jit_compile(jit_compile))


def step_callback(fn, step, after) -> None:
    """Call `fn(int(step))` on the host from inside a compiled loop (for progress bars).

    `after` is a tensor the call waits for (a slice of the step's result), so the
    host hears of a step only once it is computed.

    Example:
    >>> import keras
    >>> seen = []
    >>> def body(i, x):
    ...     step_callback(seen.append, i, x)
    ...     return x + 1.0
    >>> _ = compile_function(lambda: keras.ops.fori_loop(0, 3, body, 0.0), jit_compile=False)()
    >>> seen
    [0, 1, 2]
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
    """Context that disables gradient tracking where the backend tracks it eagerly.

    Example:
    >>> import keras
    >>> with no_grad():
    ...     y = keras.ops.ones((2,)) * 2
    """
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
