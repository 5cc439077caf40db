"""Shared test set-up: quiet backends, deterministic seeds, reference helpers."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Pooled host memory (keras_sd.backend.use_pooled_host_memory), as the keras-sd command
# uses: set before TensorFlow's first tensor, it makes large CPU activations faster.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def randomize_torch_module(module, seed: int = 0, std: float = 0.05) -> None:
    """Fill every parameter of a PyTorch module with seeded random values.

    Default initialisations leave some layers at zero or one (norm scales, some
    output convolutions), which would let a wrong mapping pass unnoticed; random
    values everywhere make each weight matter. Norm scales stay near one so
    activations keep a sane size.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            is_norm_scale = param.ndim == 1 and "norm" in name and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_scale else noise)


def torch_state_dict(module) -> dict:
    """A module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def max_abs_normalized_error(actual, expected) -> float:
    """max |a - e| / max(std(e), 1e-6): the tolerance unit used by parity tests."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / max(expected.std(), 1e-6))


def tensorflow_buffer_address(value) -> int:
    """Where a TensorFlow variable's (or tensor's) values are in memory, through DLPack
    (TF's `numpy()` would copy them)."""
    import tensorflow as tf

    value = value.value.read_value() if hasattr(value, "value") else value

    class Exported:  # numpy reads DLPack through these two methods
        def __dlpack__(self, **kwargs):
            return tf.experimental.dlpack.to_dlpack(value)

        def __dlpack_device__(self):
            return (1, 0)  # CPU

    return np.from_dlpack(Exported()).ctypes.data


FULL_SIZE = "full-size"  # the xdist group of the tests that build full-size models


def _full_size(item) -> bool:
    groups = {m.args[0] if m.args else None for m in item.iter_markers("xdist_group")}
    return item.get_closest_marker("slow") is not None or FULL_SIZE in groups


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests that build full-size models first, all in one xdist group.

    pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml) runs a group on one worker,
    one test after another: the slow-marked tests and the KerasCV module (its models
    are fixed at SD size) need up to 15 GB each, so two at once would not fit a 24 GB
    machine. Starting the group first lets the other worker run the small tests beside
    it instead of the group running alone at the end.
    """
    full, small = [], []
    for item in items:
        (full if _full_size(item) else small).append(item)
    for item in full:
        item.add_marker(pytest.mark.xdist_group(FULL_SIZE))
    items[:] = full + small


@pytest.fixture(autouse=True, scope="session")
def _full_float32_on_accelerators():
    """Full float32 matrix products and convolutions on GPUs for the whole session.

    On GPUs the backends run float32 on TF32 units by default (JAX and TensorFlow for
    matrix products and convolutions, PyTorch for cuDNN convolutions): a 10-bit mantissa,
    about 1e-3 relative error, while the parity tolerances are for float32. Seen on an
    H200: the float32-upcast VAE under JAX missed the float32 tolerance by 2e-3 and met
    it with JAX's "highest" precision. Nothing changes on a CPU.
    """
    import keras

    from keras_sd.backend import has_accelerator

    if not has_accelerator():
        return
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(0)
    np.random.seed(0)


def _record_calls(monkeypatch, name: str) -> list:
    """Records the input shape of each call of the convolution `conv.<name>` by a
    layer (at trace time when compiled)."""
    from keras_sd.models import conv

    calls = []
    compute = getattr(conv, name)

    def counted(x, kernel):
        calls.append(tuple(x.shape))
        return compute(x, kernel)

    monkeypatch.setattr(conv, name, counted)
    return calls


@pytest.fixture
def winograd_calls(monkeypatch):
    """Input shapes of the Winograd convolutions layers ran (`conv.winograd_conv3x3`)."""
    return _record_calls(monkeypatch, "winograd_conv3x3")


@pytest.fixture
def gemm_calls(monkeypatch):
    """Input shapes of the GEMM convolutions layers ran (`conv.gemm_conv3x3`)."""
    return _record_calls(monkeypatch, "gemm_conv3x3")
