"""Shared UNet/VAE blocks: config round trips and unit parity with PyTorch/diffusers."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from conftest import max_abs_normalized_error
from keras_sd import backend
from keras_sd.models.attention import dot_product_attention
from keras_sd.models.conv import Conv3x3
from keras_sd.models.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock,
    TimestepEmbedding,
    Upsample2D,
    geglu,
    timestep_embedding,
)
from keras_sd.models.transformer import Attention, BasicTransformerBlock, Transformer2D
from keras_sd.weights.state_dict import load_state_dict, named_variables

FLOAT32_TOLERANCE = 1e-4
SPATIAL = (None, None, None, 16)
TOKENS = (None, None, 16)
CONTEXT = (None, None, 12)

# (layer, build shapes): one of each class, built like its parents build it.
LAYERS = [
    (GroupNorm(4, 1e-6), (SPATIAL,)),
    (Conv3x3(8), (SPATIAL,)),
    (ResnetBlock(32, norm_groups=4), (SPATIAL, (None, 64))),
    (Downsample2D(padding=0), (SPATIAL,)),
    (Upsample2D(), (SPATIAL,)),
    (Attention(2, 8, qkv_bias=True, upcast=True), (TOKENS, CONTEXT)),
    (BasicTransformerBlock(2, 8, ff_mult=2), (TOKENS, CONTEXT)),
    (
        Transformer2D(2, 8, num_layers=2, norm_groups=4, use_linear_projection=True),
        (SPATIAL, CONTEXT),
    ),
    (TimestepEmbedding(32), ((None, 16),)),
]


@pytest.mark.parametrize("layer, shapes", LAYERS, ids=lambda v: type(v).__name__)
def test_config_round_trip(layer, shapes):
    layer.build(*shapes)
    clone = type(layer).from_config(layer.get_config())
    clone.build(*shapes)
    assert clone.get_config() == layer.get_config()
    shapes_of = lambda m: {k: tuple(v.shape) for k, v in named_variables(m).items()}  # noqa: E731
    assert shapes_of(clone) == shapes_of(layer)


def test_group_norm_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 5, 6, 16)).astype(np.float32) * 3 + 1
    ref = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    norm = GroupNorm(4, 1e-6)
    norm.build(x.shape)
    load_state_dict(norm, {k: v.numpy() for k, v in ref.state_dict().items()})
    actual = keras.ops.convert_to_numpy(norm(x))
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("padding, size", [(1, 8), (1, 7), (0, 8), (0, 7)])
def test_downsample_padding_matches_diffusers(padding, size):
    from diffusers.models.downsampling import Downsample2D as TorchDownsample

    x = np.random.default_rng(0).standard_normal((1, size, size, 4)).astype(np.float32)
    ref = TorchDownsample(4, use_conv=True, padding=padding)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    layer = Downsample2D(padding=padding)
    layer.build(x.shape)
    # diffusers registers the conv twice (`conv` and the legacy alias `Conv2d_0`).
    state = {k: v.numpy() for k, v in ref.state_dict().items() if k.startswith("conv.")}
    load_state_dict(layer, state)
    actual = keras.ops.convert_to_numpy(layer(x))
    assert actual.shape == expected.shape
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_diffusers(dim):
    t = np.array([0, 1, 250, 999], dtype=np.float32)
    expected = get_timestep_embedding(
        torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0
    ).numpy()
    actual = keras.ops.convert_to_numpy(timestep_embedding(t, dim))
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_group_norm_float32_statistics_under_float16():
    # Activations whose float16 sum of squares would overflow (> 65504).
    x = np.full((1, 16, 16, 8), 300.0, dtype=np.float32)
    x[..., ::2] = -300.0
    norm = GroupNorm(2, dtype="mixed_float16")
    out = keras.ops.convert_to_numpy(norm(x)).astype(np.float32)
    np.testing.assert_allclose(np.abs(out), 1.0, atol=1e-2)


def test_attention_upcast_avoids_float16_overflow():
    # q.k reaches ~7e5 here, past float16's 65504; upcast attention stays exact.
    x = np.random.default_rng(0).choice([-30.0, 30.0], size=(1, 6, 8)).astype(np.float32)
    weights = {
        "to_q.weight": np.eye(8) * 10,
        "to_k.weight": np.eye(8) * 10,
        "to_v.weight": np.eye(8),
        "to_out.0.weight": np.eye(8),
        "to_out.0.bias": np.zeros(8),
    }
    outputs = []
    for dtype in ("float32", "mixed_float16"):
        attn = Attention(1, 8, upcast=True, dtype=dtype)
        attn.build(x.shape)
        load_state_dict(attn, weights)
        outputs.append(keras.ops.convert_to_numpy(attn(x)).astype(np.float32))
    assert np.isfinite(outputs[1]).all()
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-2)


# (is_causal, context length): self-, cross- and causal self-attention (CLIP's).
@pytest.mark.parametrize("is_causal, context_length", [(False, None), (False, 5), (True, None)])
def test_dot_product_attention_matches_torch_sdpa(is_causal, context_length):
    """float32 against PyTorch's attention; bfloat16 inputs within bfloat16 rounding."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 7, 3, 8)).astype("float32") * 2
    k, v = (rng.standard_normal((2, context_length or 7, 3, 8)).astype("float32") for _ in "kv")
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(t).transpose(1, 2) for t in (q, k, v)), is_causal=is_causal
    ).transpose(1, 2)
    got = dot_product_attention(q, k, v, is_causal=is_causal)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected.numpy(), atol=1e-5)
    low = dot_product_attention(*(keras.ops.cast(t, "bfloat16") for t in (q, k, v)), is_causal)
    assert keras.backend.standardize_dtype(low.dtype) == "bfloat16"
    low = keras.ops.convert_to_numpy(keras.ops.cast(low, "float32"))
    np.testing.assert_allclose(low, expected.numpy(), atol=0.05)
    with pytest.raises(ValueError, match="key must be 4-D"):
        dot_product_attention(q, k[0], v)


def test_tensorflow_attention_uses_batched_matmul_not_einsum():
    """TensorFlow's bfloat16 einsum kernel is 8x slower on CPU than its batched matmul
    (measured); the graph must contain the matmuls and no einsum."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the einsum/matmul choice is TensorFlow's")
    import tensorflow as tf

    x = tf.ones((1, 4, 2, 8), "bfloat16")
    graph = tf.function(dot_product_attention).get_concrete_function(x, x, x).graph
    kinds = {op.type for op in graph.get_operations()}
    assert "BatchMatMulV2" in kinds or "BatchMatMulV3" in kinds
    assert "Einsum" not in kinds


def _softmax_input_dtypes(query):
    import tensorflow as tf

    graph = tf.function(dot_product_attention).get_concrete_function(query, query, query).graph
    return [op.inputs[0].dtype.name for op in graph.get_operations() if op.type == "Softmax"]


def test_softmax_computes_in_float32_is_measured():
    """The probe's answer holds on values it never saw: where it says the bfloat16
    kernel computes in float32, its results equal the float32 path's bit for bit."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a TensorFlow kernel property")
    import tensorflow as tf

    assert backend.softmax_computes_in_float32("float32")
    x = np.random.default_rng(7).standard_normal((16, 1000)).astype("float32") * 6
    for dtype in ("bfloat16", "float16"):
        low = tf.constant(x, dtype)
        native = tf.function(lambda t: tf.nn.softmax(t))(low)
        upcast = tf.cast(tf.nn.softmax(tf.cast(low, "float32")), dtype)
        same = bool(tf.reduce_all(native == upcast))
        assert backend.softmax_computes_in_float32(dtype) == same, dtype


def test_softmax_probe_refuses_a_kernel_that_rounds_in_between():
    """With oneDNN off, TensorFlow's own bfloat16 softmax rounds its intermediates: the
    probe must say so (checked in a fresh process, the switch is read at import)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a TensorFlow kernel property")
    code = (
        "import keras_sd.backend as b;"
        "print(b.softmax_computes_in_float32('bfloat16'), b.softmax_computes_in_float32('float32'))"
    )
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_tensorflow_attention_skips_the_float32_copy_only_where_it_is_exact(monkeypatch):
    """bfloat16 logits go to the softmax as they are where the kernel computes in float32,
    else through a float32 copy; the outputs agree with float32 attention either way."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the TensorFlow formulation")
    import tensorflow as tf

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 64, 2, 8)).astype("float32") for _ in "qkv")
    reference = keras.ops.convert_to_numpy(dot_product_attention(q, k, v))
    low = [tf.constant(t, "bfloat16") for t in (q, k, v)]
    outputs = {}
    for exact in (True, False):
        monkeypatch.setattr(backend, "softmax_computes_in_float32", lambda dtype, e=exact: e)
        assert _softmax_input_dtypes(low[0]) == ["bfloat16" if exact else "float32"]
        got = tf.function(dot_product_attention)(*low)
        outputs[exact] = keras.ops.convert_to_numpy(keras.ops.cast(got, "float32"))
        np.testing.assert_allclose(outputs[exact], reference, atol=0.03)
    monkeypatch.undo()
    if backend.softmax_computes_in_float32("bfloat16"):
        np.testing.assert_array_equal(outputs[True], outputs[False])
    assert _softmax_input_dtypes(tf.constant(q)) == ["float32"]


def _group_norm_float64(x, groups, weight, bias, epsilon):
    b, h, w, c = x.shape
    xg = x.astype("float64").reshape(b, h * w, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + epsilon)).reshape(x.shape) * weight + bias


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 3, 6])  # 6: past UNROLLED_BATCH, a loop in the graph
def test_group_norm_fused_path_matches_float64(monkeypatch, dtype, batch):
    """TensorFlow's fused path (CPU, outside XLA) against a float64 reference, on
    activations whose mean is far from zero (where E[x^2] - E[x]^2 would cancel), and
    no worse than the plain formulation; the graph must really use the fused kernel."""
    from keras_sd.backend import kernels

    if not backend.fused_group_norm_applies(keras.ops.ones((1, 2, 2, 4))):
        pytest.skip("the fused path is TensorFlow's, on a CPU")
    import tensorflow as tf

    rng = np.random.default_rng(batch)
    x = (rng.standard_normal((batch, 6, 10, 32)) * 0.5 + 40 * rng.standard_normal(32)).astype(
        "float32"
    )
    weight, bias = rng.standard_normal(32), rng.standard_normal(32)
    norm = GroupNorm(8, 1e-6, dtype=dtype)
    norm.build(x.shape)
    norm.weight.assign(weight.astype("float32"))
    norm.bias.assign(bias.astype("float32"))
    stored = [keras.ops.convert_to_numpy(keras.ops.cast(v, "float32")) for v in norm.weights]
    low = tf.constant(x, dtype)
    expected = _group_norm_float64(
        keras.ops.convert_to_numpy(keras.ops.cast(low, "float32")), 8, *stored, 1e-6
    )
    graph = tf.function(norm).get_concrete_function(low).graph.as_graph_def()
    functions = {f.signature.name: f for f in graph.library.function}
    loop_bodies = [f for name, f in functions.items() if "while_body" in name]
    assert bool(loop_bodies) == (batch > kernels.UNROLLED_BATCH)
    nodes = [*graph.node, *(n for f in functions.values() for n in f.node_def)]
    assert "FusedBatchNormV3" in {node.op for node in nodes}
    fused = keras.ops.convert_to_numpy(keras.ops.cast(norm(low), "float32"))
    monkeypatch.setattr(backend, "fused_group_norm_applies", lambda x: False)
    plain = keras.ops.convert_to_numpy(keras.ops.cast(norm(low), "float32"))
    fused_error, plain_error = np.abs(fused - expected).max(), np.abs(plain - expected).max()
    assert fused_error <= max(plain_error, 1e-5) * 1.5, (fused_error, plain_error)
    assert fused_error < (2e-3 if dtype == "float32" else 0.1)


def test_group_norm_fused_path_has_the_plain_gradients(monkeypatch):
    """The fused kernel's own gradient ignores its statistics; the layer's must not."""
    if not backend.fused_group_norm_applies(keras.ops.ones((1, 2, 2, 4))):
        pytest.skip("the fused path is TensorFlow's, on a CPU")
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((2, 4, 4, 16)).astype("float32") + 3)
    probe = tf.constant(rng.standard_normal((2, 4, 4, 16)).astype("float32"))
    norm = GroupNorm(4, 1e-5)
    norm.build(x.shape)
    norm.weight.assign(rng.standard_normal(16).astype("float32"))
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(backend, "fused_group_norm_applies", lambda x, f=fused: f)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(norm(x) * probe)
        grads.append(tape.gradient(loss, [x, norm.weight.value, norm.bias.value]))
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)
    assert float(tf.reduce_max(tf.abs(grads[0][0]))) > 1e-3  # not trivially zero


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_geglu_rounds_once_in_low_precision(dtype):
    """value * gelu(gate) for low-precision inputs is the float64 result of those very
    inputs, rounded once to the dtype (half an ulp), as diffusers' exact GELU gives it."""
    rng = np.random.default_rng(0)
    value, gate = (keras.ops.cast(rng.standard_normal((4, 64, 96)) * 3, dtype) for _ in "vg")
    out = geglu(value, gate)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    v = keras.ops.convert_to_numpy(keras.ops.cast(value, "float32")).astype("float64")
    g = keras.ops.convert_to_numpy(keras.ops.cast(gate, "float32")).astype("float64")
    expected = v * torch.nn.functional.gelu(torch.from_numpy(g)).numpy()
    got = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")).astype("float64")
    half_ulp = 2.0 ** -{"bfloat16": 8, "float16": 11}[dtype]
    # float32 arithmetic inside adds about 1e-6 relative before the final rounding, and
    # 1 + erf loses digits where gelu is near 0: an absolute 1e-6 of the inputs' scale.
    assert np.all(np.abs(got - expected) <= (half_ulp + 1e-5) * np.abs(expected) + 1e-5)


def test_geglu_float32_is_keras_exact_gelu():
    rng = np.random.default_rng(1)
    value, gate = (rng.standard_normal((2, 8, 16)).astype("float32") for _ in "vg")
    expected = value * keras.ops.convert_to_numpy(keras.ops.gelu(gate, approximate=False))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(geglu(value, gate)), expected)
