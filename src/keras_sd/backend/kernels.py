"""TensorFlow kernels chosen over Keras' portable formulation where they are faster
and at least as accurate: the fused group norm, and softmax without a float32 copy."""

from __future__ import annotations

import functools

import keras

from keras_sd.backend import devices
from keras_sd.backend.compile import tracing_for_xla


@functools.cache
def softmax_computes_in_float32(dtype) -> bool:
    """Whether TensorFlow's softmax of a `dtype` tensor, on the default device and in a
    graph, gives exactly the float32 softmax of the same values rounded to `dtype`.

    Then attention can hand the kernel its low-precision logits directly: its
    arithmetic (max, exponentials, sum) is already float32, and the float32 copy of
    the logits and the cast back are two passes over the largest tensor of SD's
    attention that buy nothing. Probed, not assumed, because kernels differ: oneDNN's
    CPU softmax computes bfloat16 in float32 (bit-identical), while TensorFlow's own
    Eigen kernel (oneDNN off) rounds in between. float32 itself: True.
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
    >>> here = keras.backend.backend() == "tensorflow" and not devices.has_accelerator()
    >>> fused_group_norm_applies(keras.ops.ones((1, 4, 4, 8))) == here
    True
    """
    if keras.backend.backend() != "tensorflow" or tracing_for_xla() or devices.has_accelerator():
        return False
    import tensorflow as tf

    return isinstance(x, tf.Tensor) and x.shape.rank == 4 and x.shape.is_fully_defined()


# Above this many samples `fused_group_norm` loops in the graph instead of unrolling: an
# unrolled graph grows with the batch, and tracing and optimizing it with it.
UNROLLED_BATCH = 4


def fused_group_norm(x, groups: int, weight, bias, epsilon: float, reference):
    """Group normalization of a channels-last TensorFlow tensor through the fused
    batch-norm kernel (oneDNN's on x86 CPUs): one pass for per-channel statistics and
    one for the normalization and affine map, both with float32 arithmetic on
    float32/bfloat16/float16 data, instead of the seven full-size passes of the plain
    formulation (cast, moments, scale, shift, cast back), with errors against float64
    no larger.

    Group statistics come from the per-channel ones by the law of total variance (no
    E[x^2] - E[x]^2 cancellation). Samples of a batch are normalized one at a time,
    since the kernel pools statistics over the batch: unrolled up to `UNROLLED_BATCH`
    samples, in a `tf.map_fn` loop above. The kernel's gradient ignores
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

        def one(sample):  # [1, H, W, C]
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
            return y

        if batch > UNROLLED_BATCH:  # a loop in the graph: its size stays that of one sample
            y = tf.map_fn(
                lambda sample: one(sample[None])[0],
                x,
                fn_output_signature=tf.TensorSpec(x.shape[1:], x.dtype),
            )
        elif batch > 1:
            y = tf.concat([one(sample) for sample in tf.split(x, batch)], 0)
        else:
            y = one(x)

        def gradient(dy):
            with tf.GradientTape() as tape:
                tape.watch([x, weight, bias])
                y = reference(x, weight, bias)
            return tape.gradient(y, [x, weight, bias], output_gradients=dy)

        return y, gradient

    return normalize(x, tf.convert_to_tensor(weight), tf.convert_to_tensor(bias))
