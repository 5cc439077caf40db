"""The one place that knows what each Keras backend does differently.

- `compile`: compiling a pure function (`compile_function`), what `jit_compile` means
  here (`resolve_jit_compile`), running models statelessly, host callbacks.
- `devices`: whether there is an accelerator, which dtypes this CPU computes natively.
- `kernels`: TensorFlow kernels that beat the portable formulation (fused group norm,
  softmax without a float32 copy).
- `memory`: host memory a backend uses without a copy, TensorFlow's pooling allocator
  (opt-in: `use_pooled_host_memory`).
- `cache`: compiled XLA programs kept on disk.
- `programs`: compiled programs shared by the models of one architecture in a process.

The names below are the public API (`keras_sd.backend.compile_function`, ...). Tests
that replace a function used inside this package patch its defining module.
"""

from keras_sd.backend.cache import (
    COMPILE_CACHE_VARIABLE,
    default_compile_cache_dir,
    enable_compile_cache,
)
from keras_sd.backend.compile import (
    JIT_CHOICES,
    XLA_CPU_MIN_PARAMS,
    compile_function,
    model_state,
    no_grad,
    resolve_jit_compile,
    stateless,
    step_callback,
    supports_step_callback,
    tracing_for_xla,
    validate_jit_compile,
)
from keras_sd.backend.devices import cpu_native_dtypes, has_accelerator
from keras_sd.backend.kernels import (
    fused_group_norm,
    fused_group_norm_applies,
    softmax_computes_in_float32,
)
from keras_sd.backend.memory import (
    HOST_ALIGNMENT,
    adopt_numpy,
    aligned_empty,
    borrow_numpy,
    host_memory_pooled,
    use_pooled_host_memory,
)
from keras_sd.backend.programs import (
    architecture_key,
    clear_shared_programs,
    register_shareable,
    register_trace_setting,
    shared_program,
    shared_stateless,
)

__all__ = [
    "COMPILE_CACHE_VARIABLE",
    "HOST_ALIGNMENT",
    "JIT_CHOICES",
    "XLA_CPU_MIN_PARAMS",
    "adopt_numpy",
    "aligned_empty",
    "architecture_key",
    "borrow_numpy",
    "clear_shared_programs",
    "compile_function",
    "cpu_native_dtypes",
    "default_compile_cache_dir",
    "enable_compile_cache",
    "fused_group_norm",
    "fused_group_norm_applies",
    "has_accelerator",
    "host_memory_pooled",
    "model_state",
    "no_grad",
    "register_shareable",
    "register_trace_setting",
    "resolve_jit_compile",
    "shared_program",
    "shared_stateless",
    "softmax_computes_in_float32",
    "stateless",
    "step_callback",
    "supports_step_callback",
    "tracing_for_xla",
    "use_pooled_host_memory",
    "validate_jit_compile",
]
