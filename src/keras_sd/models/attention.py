"""Softmax attention over `[B, L, heads, head_dim]` tensors, dispatched per backend.

JAX and PyTorch get `keras.ops.dot_product_attention` and their fused kernels; on
TensorFlow (which has none) and for float16 on JAX's CPU backend, batched matmuls.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_sd import backend


def dot_product_attention(query, key, value, is_causal: bool = False):
    """Softmax attention over `[B, L, heads, head_dim]` tensors, softmax in float32.

    On JAX and PyTorch this is `keras.ops.dot_product_attention`, which uses their
    fused kernels (except float16 on JAX's CPU backend, which compiles no such
    kernel). TensorFlow has none: Keras composes it from `einsum`s there, whose
    bfloat16 CPU kernel is slower and less accurate than the batched `matmul`s used
    here instead. Outside XLA, low-precision logits go to the softmax kernel as they
    are when it computes in float32 anyway (`keras_sd.backend.softmax_computes_in_float32`;
    oneDNN's bfloat16 kernel does), and the scale goes on q: both save full passes over
    the logits, the largest tensor of SD's attention.

    Example:
    >>> q = keras.ops.ones((1, 3, 2, 4))
    >>> tuple(dot_product_attention(q, q, q, is_causal=True).shape)
    (1, 3, 2, 4)
    """
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if len(tensor.shape) != 4:
            raise ValueError(
                f"dot_product_attention: {name} must be 4-D [batch, length, heads, "
                f"head_dim]; received shape {tuple(tensor.shape)}."
            )
    if keras.backend.backend() != "tensorflow" and not _jax_cpu_float16(query):
        return ops.dot_product_attention(query, key, value, is_causal=is_causal)
    # The scale goes on q ([B, T, N, H]), not on the S/H times larger logits.
    scale = ops.cast(1.0 / math.sqrt(query.shape[-1]), query.dtype)
    q = ops.transpose(query * scale, (0, 2, 1, 3))  # [B, N, T, H]
    k = ops.transpose(key, (0, 2, 3, 1))  # [B, N, H, S]
    v = ops.transpose(value, (0, 2, 1, 3))  # [B, N, S, H]
    logits = ops.matmul(q, k)
    if is_causal:
        t, s = ops.shape(logits)[-2], ops.shape(logits)[-1]
        later = ops.arange(s)[None, :] > ops.arange(t)[:, None]
        logits = ops.where(later, ops.cast(float("-inf"), logits.dtype), logits)
    if backend.tracing_for_xla() or not backend.softmax_computes_in_float32(logits.dtype):
        # XLA fuses these casts into the softmax; elsewhere they are full passes.
        probs = ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), value.dtype)
    else:
        probs = ops.softmax(logits, axis=-1)  # float32 arithmetic inside the kernel
    return ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3))


def _jax_cpu_float16(query) -> bool:
    """Whether this is float16 attention on JAX's CPU backend. There, jit-compiled
    `jax.nn.dot_product_attention` asks XLA for float16 products accumulated in
    float32, which its CPU backend refuses (jax 0.10: "The precision 'F16_F16_F32' is
    not supported by dot_general on CPU"), so the matmuls below are used instead."""
    return (
        keras.backend.backend() == "jax"
        and keras.backend.standardize_dtype(query.dtype) == "float16"
        and not backend.has_accelerator()
    )
