"""Winograd F(2x2, 3x3) and GEMM ("im2col") 3x3 convolutions, and upsampling convolutions
by phases: exact up to rounding, and used only where chosen."""

import keras
import numpy as np
import pytest
import torch

from keras_sd import backend
from keras_sd.models import conv
from keras_sd.models import layers as model_layers
from keras_sd.models.conv import (
    Conv3x3,
    gemm_conv3x3,
    set_conv_algorithm,
    upsample_conv3x3,
    winograd_conv3x3,
)
from keras_sd.models.layers import Upsample2D

BACKEND = keras.backend.backend()


@pytest.fixture
def algorithm():
    """Restores the module-wide choice after a test changes it."""
    previous = set_conv_algorithm("auto")
    yield set_conv_algorithm
    set_conv_algorithm(previous)


def torch_conv3x3(x, kernel, bias=None):
    """PyTorch's convolution (padding 1) on channels-last numpy arrays."""
    out = torch.nn.functional.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(kernel).permute(3, 2, 0, 1),
        None if bias is None else torch.from_numpy(bias),
        padding=1,
    )
    return out.permute(0, 2, 3, 1).numpy()


def random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


SHAPES = [((1, 4, 4, 1), 1), ((2, 6, 10, 5), 7), ((3, 16, 8, 32), 24)]


# GEMM also takes odd and unit sizes.
GEMM_SHAPES = SHAPES + [((1, 5, 3, 2), 4), ((2, 1, 7, 3), 5)]


@pytest.mark.parametrize(
    "compute, shape, cout",
    [(winograd_conv3x3, *case) for case in SHAPES]
    + [(gemm_conv3x3, *case) for case in GEMM_SHAPES],
)
def test_matches_torch_convolution(compute, shape, cout):
    x, kernel = random(shape, 0), random((3, 3, shape[-1], cout), 1)
    out = keras.ops.convert_to_numpy(compute(x, kernel))
    expected = torch_conv3x3(x, kernel)
    # float32 rounding only: ~1e-6 of the largest output was measured.
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


def test_winograd_needs_even_static_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        winograd_conv3x3(random((1, 5, 4, 2), 0), random((3, 3, 2, 2), 1))


def test_conv_algorithm_is_validated(algorithm):
    with pytest.raises(ValueError, match="'auto', 'direct', 'winograd'"):
        algorithm("fast")
    with pytest.raises(ValueError, match="strides 1"):
        Conv3x3(4, strides=2)


def run_layer(x, jit=None, dtype="float32", filters=6):
    """A fresh Conv3x3 on `x`: eager (jit None) or through `compile_function(jit)`."""
    layer = Conv3x3(filters, dtype=dtype)
    layer.build(x.shape)
    keras.utils.set_random_seed(3)
    layer.bias.assign(keras.random.normal(layer.bias.shape))
    x = keras.ops.cast(x, layer.compute_dtype)
    if jit is None:
        out = layer(x)
    else:
        out = backend.compile_function(backend.stateless(layer), jit)(backend.model_state(layer), x)
    weights = [keras.ops.convert_to_numpy(v).astype(np.float32) for v in (layer.kernel, layer.bias)]
    return keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")), weights


# Tiles: batch x H/2 x W/2, against WINOGRAD_MIN_TILES (256).
LARGE, SMALL = (1, 32, 32, 4), (1, 16, 30, 4)


def test_auto_uses_winograd_under_xla_in_float32_for_large_inputs(algorithm, winograd_calls):
    x = random(LARGE, 0)
    out, (kernel, bias) = run_layer(x, jit=True)
    np.testing.assert_allclose(out, torch_conv3x3(x, kernel, bias), atol=1e-4)
    # XLA traces: TensorFlow with jit_compile, and JAX always; torch.compile is not XLA.
    assert winograd_calls == ([LARGE] if BACKEND in ("tensorflow", "jax") else [])


@pytest.mark.parametrize(
    "case",
    ["eager", "graph", "small input", "bfloat16", "direct chosen", "accelerator"],
)
def test_auto_keeps_the_direct_convolution(
    case, algorithm, winograd_calls, gemm_calls, monkeypatch
):
    x, jit, dtype = random(LARGE, 0), True, "float32"
    if case == "eager":
        jit = None
    elif case == "graph":
        if BACKEND == "jax":
            pytest.skip("JAX has no compiled mode other than XLA")
        jit = False
    elif case == "small input":
        x = random(SMALL, 0)
    elif case == "bfloat16":
        dtype = "bfloat16"
    elif case == "direct chosen":
        algorithm("direct")
    else:
        monkeypatch.setattr(backend, "has_accelerator", lambda: True)
    out, (kernel, bias) = run_layer(x, jit=jit, dtype=dtype)
    assert winograd_calls == [] and gemm_calls == []
    tolerance = 0.1 if dtype == "bfloat16" else 1e-4
    np.testing.assert_allclose(out, torch_conv3x3(x, kernel, bias), atol=tolerance, rtol=0.02)


def test_winograd_chosen_applies_everywhere(algorithm, winograd_calls):
    algorithm("winograd")
    x = random(SMALL, 0)
    out, (kernel, bias) = run_layer(x)
    assert winograd_calls == [SMALL]
    np.testing.assert_allclose(out, torch_conv3x3(x, kernel, bias), atol=1e-4)


def test_gemm_needs_static_sizes():
    with pytest.raises(ValueError, match="static height, width and channels"):
        gemm_conv3x3(keras.KerasTensor((1, None, 4, 2)), random((3, 3, 2, 2), 1))


def test_gemm_chosen_applies_everywhere(algorithm, gemm_calls, winograd_calls):
    algorithm("gemm")
    x = random((1, 5, 7, 4), 0)  # odd sizes: no Winograd, GEMM still applies
    out, (kernel, bias) = run_layer(x, jit=True)
    assert gemm_calls == [(1, 5, 7, 4)] and winograd_calls == []
    np.testing.assert_allclose(out, torch_conv3x3(x, kernel, bias), atol=1e-4)


# Outside XLA on a TensorFlow CPU, "auto" picks GEMM by GEMM_RULES: (rows, kernel bytes).
@pytest.mark.parametrize(
    "shape, rules, chosen",
    [
        ((1, 8, 8, 4), ((64, 864),), True),  # rows 64, 9*4*6*4 = 864 bytes: both at the bound
        ((1, 8, 10, 4), ((64, 864),), False),  # one row too many
        ((1, 8, 8, 4), ((64, 865),), False),  # one byte too few
        ((1, 8, 8, 4), ((16, 1), (64, 864)), True),  # the second rule
    ],
)
@pytest.mark.parametrize("jit", [None, False])
def test_auto_uses_gemm_by_its_rules(shape, rules, chosen, jit, algorithm, gemm_calls, monkeypatch):
    if BACKEND == "jax" and jit is False:
        pytest.skip("JAX has no compiled mode other than XLA")
    monkeypatch.setattr(conv, "GEMM_RULES", rules)
    x = random(shape, 0)
    out, (kernel, bias) = run_layer(x, jit=jit)
    # Measured on TensorFlow's oneDNN kernels only; other backends keep theirs.
    assert gemm_calls == ([shape] if chosen and BACKEND == "tensorflow" else [])
    np.testing.assert_allclose(out, torch_conv3x3(x, kernel, bias), atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_uses_gemm_for_sd_sized_kernels_on_few_positions(dtype, algorithm, gemm_calls):
    """The real rules: a 1280-channel 3x3 kernel (29 MB in bfloat16) at 4x4, as at the
    SD 1.5 UNet's lowest level for 256 px images, but not on 576 positions (rows)."""
    small, large = random((1, 4, 4, 1280), 0), random((1, 24, 24, 1280), 0)
    jit = None if BACKEND == "jax" else False
    out, (kernel, bias) = run_layer(small, jit=jit, dtype=dtype, filters=1280)
    run_layer(large, jit=jit, dtype=dtype, filters=1280)
    assert gemm_calls == ([small.shape] if BACKEND == "tensorflow" else [])
    expected = torch_conv3x3(small, kernel, bias)
    # bfloat16 inputs and products, float32 sums: about 2**-8 of the output's size.
    tolerance = 1e-4 if dtype == "float32" else 0.02 * np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=tolerance)


@pytest.mark.parametrize("case", ["xla", "accelerator"])
def test_auto_uses_gemm_only_outside_xla_on_cpus(case, algorithm, gemm_calls, monkeypatch):
    monkeypatch.setattr(conv, "GEMM_RULES", ((64, 1),))  # every small input qualifies
    jit = True if case == "xla" else None
    if case == "accelerator":
        monkeypatch.setattr(backend, "has_accelerator", lambda: True)
    x = random((1, 8, 8, 4), 0)
    out, (kernel, bias) = run_layer(x, jit=jit)
    assert gemm_calls == []
    np.testing.assert_allclose(out, torch_conv3x3(x, kernel, bias), atol=1e-4)


def nearest_up(x):
    return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)


@pytest.mark.parametrize("shape, cout", [((1, 1, 1, 2), 3), ((2, 3, 5, 4), 6), ((1, 8, 6, 16), 8)])
def test_upsample_by_phases_matches_torch(shape, cout):
    x, kernel = random(shape, 0), random((3, 3, shape[-1], cout), 1)
    out = keras.ops.convert_to_numpy(upsample_conv3x3(x, kernel))
    np.testing.assert_allclose(out, torch_conv3x3(nearest_up(x), kernel), atol=1e-4)


def run_upsample(x, dtype, jit):
    layer = Upsample2D(dtype=dtype)
    layer.build(x.shape)
    keras.utils.set_random_seed(4)
    layer.conv.bias.assign(keras.random.normal(layer.conv.bias.shape))
    state = backend.model_state(layer)
    call = backend.compile_function(backend.stateless(layer), jit)
    out = call(state, keras.ops.cast(x, layer.compute_dtype))
    weights = [keras.ops.convert_to_numpy(v).astype(np.float32) for v in layer.conv.weights]
    return keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")), weights


@pytest.mark.parametrize(
    "dtype, rows, jit, chosen",
    [
        ("mixed_bfloat16", 64, False, True),  # 2 x 4 x 8 positions: at the bound
        ("bfloat16", 64, False, True),
        ("mixed_bfloat16", 65, False, False),  # one position short
        ("float32", 64, False, False),  # float32 keeps its results
        ("mixed_bfloat16", 64, True, False),  # XLA fuses the upsampling itself
    ],
)
def test_upsample_by_phases_where_auto_chooses(dtype, rows, jit, chosen, algorithm, monkeypatch):
    if BACKEND == "jax" and jit is False:
        pytest.skip("JAX has no compiled mode other than XLA")
    monkeypatch.setattr(conv, "PHASE_UPSAMPLE_MIN_ROWS", rows)
    calls = []
    spy = lambda *args: calls.append(1) or upsample_conv3x3(*args)  # noqa: E731
    monkeypatch.setattr(model_layers, "upsample_conv3x3", spy)
    x = random((2, 4, 8, 16), 2)
    out, (kernel, bias) = run_upsample(x, dtype, jit)
    assert len(calls) == (1 if chosen and BACKEND == "tensorflow" else 0)
    low = keras.ops.cast(x, "float32" if dtype == "float32" else "bfloat16")
    rounded = keras.ops.convert_to_numpy(keras.ops.cast(low, "float32"))
    expected = torch_conv3x3(nearest_up(rounded), kernel, bias)
    # bfloat16 inputs and products, float32 sums: about 2**-8 of the output's size.
    tolerance = 1e-4 if dtype == "float32" else 0.02 * np.abs(expected).max()
    np.testing.assert_allclose(out, expected, atol=tolerance)
