"""Building blocks shared by the UNet and the VAE.

Every layer is channels-last and names its sublayers after the matching
diffusers module (`norm1`, `conv1`, `to_q`, `ff.net.0.proj`, ...), so
`keras_sd.weights.state_dict.named_variables` yields diffusers state-dict keys.
Layers infer their input channels in `build()`; parents call `build()` with
shapes so a whole model is built at construction without a forward pass.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

from keras_sd import backend


def dot_product_attention(query, key, value, is_causal: bool = False):
    """Softmax attention over `[B, L, heads, head_dim]` tensors, softmax in float32.

    On JAX and PyTorch this is `keras.ops.dot_product_attention`, which uses their
    fused kernels (except float16 on JAX's CPU backend, which compiles no such
    kernel). TensorFlow has none: Keras composes it from `einsum`s there, whose
    bfloat16 CPU kernel ran a 1024-token SD self-attention 8x slower (710 against
    92 ms on a 2-core CPU, graph mode) and less accurately than the batched `matmul`s
    used here instead (float32 and XLA: the same speed). Outside XLA, low-precision
    logits go to the softmax kernel as they are when it computes in float32 anyway
    (`keras_sd.backend.softmax_computes_in_float32`; oneDNN's bfloat16 kernel does),
    which with the scale applied to q made a 4096-token bfloat16 self-attention
    1.7x faster on an AVX-512 BF16 CPU (0.24 against 0.40 s, batch 2, 8 heads).

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


CONV_ALGORITHMS = ("auto", "direct", "winograd", "gemm")
_conv_algorithm = {"value": "auto"}

# Conv3x3 "auto": Winograd from this many 2x2 output tiles (batch x H/2 x W/2) up.
# Measured on a 2-core AVX2 CPU, TensorFlow XLA, float32, one conv against
# `tf.nn.conv2d` (benchmarks/RESULTS.md, 2026-11-28): 1.1-1.8x faster from 256 tiles up
# (SD 1.5 UNet levels at 32x32 and 64x64 latents, every VAE decoder level at 512 px),
# 0.4-0.7x at 64-128 tiles with 1280 channels (the 8x8/16x16 levels), where the
# transformed kernel (16/9 of the weights) is re-read for too few tiles.
WINOGRAD_MIN_TILES = 256

# Conv3x3 "auto": one matrix product over the 3x3 patches (`gemm_conv3x3`) where
# TensorFlow's own CPU convolution (oneDNN) is slowest: kernels of many megabytes applied
# to few output positions. A call takes it when its rows (batch x H x W) and its kernel's
# bytes in the compute dtype meet either (rows, bytes) pair below. Measured on a 2-core
# AVX-512 BF16 CPU, graph mode, bfloat16 and float32, one convolution against
# `tf.nn.conv2d` (benchmarks/RESULTS.md, 2026-11-28 night): 0.35-0.6x the time for the
# SD 1.5 UNet's 1920- and 2560-channel inputs at 4x4 and 8x8 (rows 32 and 128, batch 2),
# 0.78x for 1280 channels at 4x4, 0.87-0.98x at 16x16 (rows 512); slower (1.02-2.1x) for
# smaller kernels or more rows, e.g. 1280 channels at 16x16 in bfloat16.
GEMM_RULES = ((512, 40e6), (64, 16e6))


def set_conv_algorithm(algorithm: str) -> str:
    """Choose how `Conv3x3` layers compute; returns the previous choice.

    Args:
        algorithm: "auto" (default): each algorithm where it was measured faster.
            Winograd's F(2x2, 3x3) while `keras_sd.backend.compile_function` traces
            for XLA (TensorFlow XLA or JAX) on a CPU, in float32, for inputs of at
            least `WINOGRAD_MIN_TILES` output tiles; one matrix product over the
            patches (`gemm_conv3x3`) on a TensorFlow CPU outside XLA where
            `GEMM_RULES` says the kernel is large for the number of output positions;
            the backend's convolution otherwise. "direct": always the backend's
            convolution. "winograd" / "gemm": that algorithm for every eligible call
            (any backend, device and dtype; Winograd needs even sizes), for tests and
            experiments.

    Example:
    >>> previous = set_conv_algorithm("direct")
    >>> set_conv_algorithm(previous)
    'direct'
    """
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(
            f"set_conv_algorithm: algorithm must be one of {CONV_ALGORITHMS}; "
            f"received {algorithm!r}."
        )
    previous, _conv_algorithm["value"] = _conv_algorithm["value"], algorithm
    return previous


def _f23_data(d0, d1, d2, d3):
    """Winograd F(2, 3) input transform (B^T d) along one axis."""
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _f23_kernel(g0, g1, g2):
    """Winograd F(2, 3) kernel transform (G g) along one axis."""
    return [g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]


def _f23_output(m0, m1, m2, m3):
    """Winograd F(2, 3) output transform (A^T m) along one axis."""
    return [m0 + m1 + m2, m1 - m2 - m3]


def winograd_conv3x3(x, kernel):
    """A 3x3, stride-1, "same"-padded convolution by Winograd's F(2x2, 3x3) algorithm.

    Each 2x2 output tile comes from a 4x4 input tile: both are transformed so the
    convolution becomes 16 matrix products of [tiles, Cin] by [Cin, Cout], 16
    multiplications per tile and channel pair instead of the direct form's 36. The
    transforms are additions (and halvings of the kernel), fused by XLA. The result
    equals the direct convolution up to float rounding (measured ~1e-6 of the output's
    largest value in float32).

    Args:
        x: `[B, H, W, Cin]` with static, even H and W.
        kernel: `[3, 3, Cin, Cout]`.

    Returns:
        `[B, H, W, Cout]`.

    Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 4, 6, 3)).astype("float32")
    >>> k = np.random.default_rng(1).standard_normal((3, 3, 3, 2)).astype("float32")
    >>> direct = keras.ops.conv(x, k, padding="same")
    >>> float(keras.ops.max(keras.ops.abs(winograd_conv3x3(x, k) - direct))) < 1e-4
    True
    """
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    if h is None or w is None or h % 2 or w % 2:
        raise ValueError(
            f"winograd_conv3x3: x must have static, even height and width; received "
            f"shape {tuple(x.shape)}."
        )
    th, tw = h // 2, w // 2
    xp = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    tiles = []
    for rows in _f23_data(*(xp[:, a : a + 2 * th : 2] for a in range(4))):
        tiles += _f23_data(*(rows[:, :, b : b + 2 * tw : 2] for b in range(4)))
    tiles = ops.reshape(ops.stack(tiles, axis=0), (16, -1, cin))  # [16, B*th*tw, Cin]
    u = []
    for rows in _f23_kernel(kernel[0], kernel[1], kernel[2]):
        u += _f23_kernel(rows[0], rows[1], rows[2])
    m = ops.reshape(ops.matmul(tiles, ops.stack(u, axis=0)), (4, 4, -1, th, tw, cout))
    t0, t1 = _f23_output(m[0], m[1], m[2], m[3])  # each [4, B, th, tw, Cout]
    y0, y1 = (ops.stack(_f23_output(t[0], t[1], t[2], t[3]), axis=3) for t in (t0, t1))
    return ops.reshape(ops.stack([y0, y1], axis=2), (-1, h, w, cout))  # [B, th, 2, tw, 2, C]


def _itemsize(dtype) -> int:
    """Bytes per element of a float dtype ("bfloat16" -> 2)."""
    return int("".join(c for c in keras.backend.standardize_dtype(dtype) if c.isdigit())) // 8


def gemm_conv3x3(x, kernel):
    """A 3x3, stride-1, "same"-padded convolution as one matrix product ("im2col").

    The nine shifted copies of the zero-padded input are concatenated along channels,
    `[B*H*W, 9*Cin]`, and multiplied by the kernel read as `[9*Cin, Cout]` (its memory
    order already), so the work is one large `matmul` and the kernel is used as stored.
    Costs a patch buffer nine times the input's size. Equals the direct convolution up
    to float rounding.

    Args:
        x: `[B, H, W, Cin]` with static H, W and Cin.
        kernel: `[3, 3, Cin, Cout]`.

    Returns:
        `[B, H, W, Cout]`.

    Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 5, 3, 2)).astype("float32")
    >>> k = np.random.default_rng(1).standard_normal((3, 3, 2, 4)).astype("float32")
    >>> direct = keras.ops.conv(x, k, padding="same")
    >>> float(keras.ops.max(keras.ops.abs(gemm_conv3x3(x, k) - direct))) < 1e-4
    True
    """
    _, h, w, cin = x.shape
    cout = kernel.shape[-1]
    if h is None or w is None or cin is None:
        raise ValueError(
            "gemm_conv3x3: x must have static height, width and channels; received "
            f"shape {tuple(x.shape)}."
        )
    xp = ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # (row offset, column offset, channel): the order of the kernel's first three axes.
    patches = ops.concatenate([xp[:, a : a + h, b : b + w] for a in range(3) for b in range(3)], -1)
    out = ops.matmul(ops.reshape(patches, (-1, 9 * cin)), ops.reshape(kernel, (9 * cin, cout)))
    return ops.reshape(out, (-1, h, w, cout))


@keras.saving.register_keras_serializable(package="keras_sd")
class Conv3x3(layers.Conv2D):
    """A 3x3, stride-1, "same" `keras.layers.Conv2D` that can compute by Winograd or GEMM.

    Same variables, names and results as `Conv2D(filters, 3, padding="same")`;
    `set_conv_algorithm` says when `winograd_conv3x3` or `gemm_conv3x3` replaces the
    backend's convolution (by default: Winograd under XLA on a CPU in float32 for large
    enough inputs, where it was 1.1-1.8x faster per convolution; GEMM on a TensorFlow
    CPU outside XLA for large kernels on few positions, `GEMM_RULES`).

    Example:
    >>> conv = Conv3x3(4)
    >>> tuple(conv(keras.ops.ones((1, 8, 8, 2))).shape)
    (1, 8, 8, 4)
    """

    def __init__(self, filters: int, **kwargs):
        kwargs.setdefault("kernel_size", 3)
        kwargs.setdefault("padding", "same")
        super().__init__(filters, **kwargs)
        if (self.kernel_size, self.strides, self.padding) != ((3, 3), (1, 1), "same"):
            raise ValueError(
                "Conv3x3: kernel_size must be 3, strides 1 and padding 'same'; received "
                f"{self.kernel_size}, {self.strides}, {self.padding!r}."
            )

    def _algorithm(self, x) -> str:
        """Which of "winograd", "gemm" or "direct" computes input `x` (static shapes when
        compiled)."""
        algorithm = _conv_algorithm["value"]
        n, h, w, cin = x.shape
        if (
            algorithm == "direct"
            or self.dilation_rate != (1, 1)
            or self.groups != 1
            or self.data_format != "channels_last"
            or None in (n, h, w, cin)
        ):
            return "direct"
        even = h % 2 == 0 and w % 2 == 0
        if algorithm != "auto":
            return algorithm if algorithm == "gemm" or even else "direct"
        chosen = "direct"
        if backend.tracing_for_xla():
            tiles = n * (h // 2) * (w // 2)
            if even and self.compute_dtype == "float32" and tiles >= WINOGRAD_MIN_TILES:
                chosen = "winograd"
        elif keras.backend.backend() == "tensorflow":
            rows, kernel_bytes = n * h * w, 9 * cin * self.filters * _itemsize(x.dtype)
            if any(rows <= most and kernel_bytes >= least for most, least in GEMM_RULES):
                chosen = "gemm"
        # Both were measured on CPUs only. Asked last: most calls need not ask the device.
        return "direct" if chosen == "direct" or backend.has_accelerator() else chosen

    def convolution_op(self, inputs, kernel):
        # Keras' Conv2D.call adds the bias and activation around this.
        algorithm = self._algorithm(inputs)
        if algorithm == "direct":
            return super().convolution_op(inputs, kernel)
        compute = winograd_conv3x3 if algorithm == "winograd" else gemm_conv3x3
        return compute(inputs, ops.cast(kernel, inputs.dtype))

    def get_config(self):
        config = super().get_config()
        for fixed in ("kernel_size", "strides", "padding"):
            config.pop(fixed)
        return config


def spatial_shape(channels: int) -> tuple:
    """Build shape of a channels-last feature map of any batch and size."""
    return (None, None, None, channels)


@keras.saving.register_keras_serializable(package="keras_sd")
class GroupNorm(layers.Layer):
    """Group normalization over channels-last tensors, statistics in float32.

    Its variables are named `weight` and `bias` like `torch.nn.GroupNorm`, and the
    arithmetic runs in float32 even under mixed precision (float16 variance
    overflows on large activations).

    Args:
        groups: number of channel groups; must divide the channel count.
        epsilon: added to the variance.

    Returns:
        A tensor of the input's shape in the layer's compute dtype.

    Example:
    >>> norm = GroupNorm(groups=8, epsilon=1e-6)
    >>> tuple(norm(keras.ops.ones((1, 4, 4, 32))).shape)
    (1, 4, 4, 32)
    """

    def __init__(self, groups: int, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups
        self.epsilon = epsilon
        self.autocast = False  # we cast ourselves, to float32

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise ValueError(
                f"GroupNorm: {channels} channels not divisible by {self.groups} groups"
            )
        self.weight = self.add_weight(
            name="weight", shape=(channels,), initializer="ones", autocast=False
        )
        self.bias = self.add_weight(
            name="bias", shape=(channels,), initializer="zeros", autocast=False
        )

    def call(self, x):
        same_dtype = keras.backend.standardize_dtype(x.dtype) == self.compute_dtype
        if same_dtype and backend.fused_group_norm_applies(x):
            return backend.fused_group_norm(
                x, self.groups, self.weight, self.bias, self.epsilon, self._plain
            )
        return self._plain(x, self.weight, self.bias)

    def _plain(self, x, weight, bias):
        """The portable formulation (and the fused one's gradient)."""
        shape = ops.shape(x)
        channels = x.shape[-1]
        per_group = channels // self.groups
        x = ops.reshape(ops.cast(x, "float32"), (shape[0], -1, self.groups, per_group))
        mean, var = ops.moments(x, axes=(1, 3), keepdims=True)  # [B, 1, G, 1]
        # Fold the normalisation and the affine map into one scale and shift per
        # (sample, channel): two full-size passes instead of four.
        # float32 affine parameters too: under a pure bfloat16/float16 policy they are
        # stored in low precision.
        weight = ops.reshape(ops.cast(weight, "float32"), (self.groups, per_group))
        scale = ops.rsqrt(var + self.epsilon) * weight
        shift = ops.reshape(ops.cast(bias, "float32"), (self.groups, per_group)) - mean * scale
        return ops.cast(ops.reshape(x * scale + shift, shape), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_sd")
class ResnetBlock(layers.Layer):
    """Residual block: GroupNorm, SiLU, 3x3 conv, twice, with an optional time embedding.

    `time_emb_proj` exists when the block is built with a `temb_shape`;
    `conv_shortcut` (1x1) exists when the channel count changes.

    Args:
        out_channels: output channels.
        norm_groups: groups of both GroupNorms.
        norm_eps: epsilon of both GroupNorms.

    Returns:
        `call(x [B, H, W, Cin], temb [B, T] or None)` -> `[B, H, W, out_channels]`.

    Example:
    >>> block = ResnetBlock(64, norm_groups=8)
    >>> block.build((None, None, None, 32), (None, 128))
    >>> tuple(block(keras.ops.ones((1, 8, 8, 32)), keras.ops.ones((1, 128))).shape)
    (1, 8, 8, 64)
    """

    def __init__(self, out_channels: int, norm_groups: int = 32, norm_eps: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = out_channels
        self.norm_groups = norm_groups
        self.norm_eps = norm_eps

    def build(self, x_shape, temb_shape=None):
        in_channels, out = x_shape[-1], self.out_channels
        norm = dict(groups=self.norm_groups, epsilon=self.norm_eps, dtype=self.dtype_policy)
        self.norm1 = GroupNorm(**norm, name="norm1")
        self.conv1 = Conv3x3(out, dtype=self.dtype_policy, name="conv1")
        self.norm2 = GroupNorm(**norm, name="norm2")
        self.conv2 = Conv3x3(out, dtype=self.dtype_policy, name="conv2")
        self.norm1.build(x_shape)
        self.conv1.build(x_shape)
        self.norm2.build(spatial_shape(out))
        self.conv2.build(spatial_shape(out))
        self.time_emb_proj = None
        if temb_shape is not None:
            self.time_emb_proj = layers.Dense(out, dtype=self.dtype_policy, name="time_emb_proj")
            self.time_emb_proj.build(temb_shape)
        self.conv_shortcut = None
        if in_channels != out:
            self.conv_shortcut = layers.Conv2D(
                out, 1, dtype=self.dtype_policy, name="conv_shortcut"
            )
            self.conv_shortcut.build(x_shape)

    def call(self, x, temb=None):
        h = self.conv1(ops.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(ops.silu(temb))[:, None, None, :]
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h

    def get_config(self):
        return {
            **super().get_config(),
            "out_channels": self.out_channels,
            "norm_groups": self.norm_groups,
            "norm_eps": self.norm_eps,
        }


@keras.saving.register_keras_serializable(package="keras_sd")
class Downsample2D(layers.Layer):
    """Stride-2 3x3 convolution `conv` that halves height and width.

    Args:
        padding: as in diffusers: `1` pads one pixel on every side (UNet), `0` pads
            one pixel on the bottom and right only (VAE encoder).

    Returns:
        `[B, H, W, C]` -> `[B, H/2, W/2, C]` (even H and W).

    Example:
    >>> tuple(Downsample2D(padding=1)(keras.ops.ones((1, 8, 8, 16))).shape)
    (1, 4, 4, 16)
    """

    def __init__(self, padding: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.padding = padding
        pad = (0, 1) if padding == 0 else (padding, padding)
        self._pads = ((0, 0), pad, pad, (0, 0))

    def build(self, input_shape):
        self.conv = layers.Conv2D(
            input_shape[-1], 3, strides=2, dtype=self.dtype_policy, name="conv"
        )
        self.conv.build(input_shape)

    def call(self, x):
        # Explicit padding: Keras "same" pads bottom/right first, PyTorch top/left.
        return self.conv(ops.pad(x, self._pads))

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}


@keras.saving.register_keras_serializable(package="keras_sd")
class Upsample2D(layers.Layer):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution `conv`.

    Returns:
        `[B, H, W, C]` -> `[B, 2H, 2W, C]`.

    Example:
    >>> tuple(Upsample2D()(keras.ops.ones((1, 4, 4, 16))).shape)
    (1, 8, 8, 16)
    """

    def build(self, input_shape):
        self.conv = Conv3x3(input_shape[-1], dtype=self.dtype_policy, name="conv")
        self.conv.build(input_shape)

    def call(self, x):
        b, h, w, c = ops.shape(x)
        # One broadcast + reshape copies the tensor once (two `repeat`s copy it twice).
        x = ops.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(ops.reshape(x, (b, h * 2, w * 2, c)))


@keras.saving.register_keras_serializable(package="keras_sd")
class Attention(layers.Layer):
    """Multi-head attention with diffusers' `to_q`, `to_k`, `to_v`, `to_out.0` layers.

    Self-attention when `context` is None, cross-attention otherwise. The core is
    `dot_product_attention` on `[B, L, heads, head_dim]`, which uses fused kernels
    where the backend has them and keeps the softmax in float32.

    Args:
        num_heads: attention heads.
        head_dim: channels per head; `num_heads * head_dim` is the inner width.
        qkv_bias: whether `to_q`/`to_k`/`to_v` have a bias (UNet: no, VAE: yes).
        upcast: under float16, compute the whole attention in float32 (diffusers'
            `upcast_attention`, needed by SD 2.x 768 models whose logits overflow).

    Returns:
        `call(x [B, T, C], context [B, S, D] or None)` -> `[B, T, C]`.

    Example:
    >>> attn = Attention(num_heads=2, head_dim=8)
    >>> attn.build((None, None, 32), (None, None, 24))
    >>> tuple(attn(keras.ops.ones((1, 5, 32)), keras.ops.ones((1, 7, 24))).shape)
    (1, 5, 32)
    """

    def __init__(
        self, num_heads: int, head_dim: int, qkv_bias: bool = False, upcast: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv_bias = qkv_bias
        self.upcast = upcast

    def build(self, x_shape, context_shape=None):
        inner = self.num_heads * self.head_dim
        dense = dict(use_bias=self.qkv_bias, dtype=self.dtype_policy)
        self.to_q = layers.Dense(inner, **dense, name="to_q")
        self.to_k = layers.Dense(inner, **dense, name="to_k")
        self.to_v = layers.Dense(inner, **dense, name="to_v")
        self.to_out = layers.Dense(x_shape[-1], dtype=self.dtype_policy, name="to_out-0")
        context_shape = x_shape if context_shape is None else context_shape
        self.to_q.build(x_shape)
        self.to_k.build(context_shape)
        self.to_v.build(context_shape)
        self.to_out.build((None, None, inner))

    def _split_heads(self, x):
        b, length = ops.shape(x)[0], ops.shape(x)[1]
        return ops.reshape(x, (b, length, self.num_heads, self.head_dim))

    def call(self, x, context=None):
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))  # [B, T, heads, head_dim]
        k = self._split_heads(self.to_k(context))  # [B, S, heads, head_dim]
        v = self._split_heads(self.to_v(context))
        if self.upcast and self.compute_dtype == "float16":
            q, k, v = (ops.cast(t, "float32") for t in (q, k, v))
        out = dot_product_attention(q, k, v)
        b, length = ops.shape(x)[0], ops.shape(x)[1]
        out = ops.reshape(
            ops.cast(out, self.compute_dtype), (b, length, self.num_heads * self.head_dim)
        )
        return self.to_out(out)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "qkv_bias": self.qkv_bias,
            "upcast": self.upcast,
        }


@keras.saving.register_keras_serializable(package="keras_sd")
class BasicTransformerBlock(layers.Layer):
    """Pre-norm transformer block: self-attention, cross-attention, GEGLU feed-forward.

    Sublayers: `norm1`, `attn1`, `norm2`, `attn2`, `norm3`, `ff.net.0.proj`
    (projects to twice the hidden width: value and gate), `ff.net.2`.

    Args:
        num_heads: attention heads of both attentions.
        head_dim: channels per head.
        norm_eps: epsilon of the three LayerNorms.
        ff_mult: feed-forward hidden width as a multiple of the block width.
        upcast_attention: see `Attention.upcast`.

    Returns:
        `call(x [B, T, C], context [B, S, D])` -> `[B, T, C]`.

    Example:
    >>> block = BasicTransformerBlock(num_heads=2, head_dim=16)
    >>> block.build((None, None, 32), (None, None, 24))
    >>> tuple(block(keras.ops.ones((1, 5, 32)), keras.ops.ones((1, 7, 24))).shape)
    (1, 5, 32)
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        norm_eps: float = 1e-5,
        ff_mult: int = 4,
        upcast_attention: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.norm_eps = norm_eps
        self.ff_mult = ff_mult
        self.upcast_attention = upcast_attention

    def build(self, x_shape, context_shape):
        dim = x_shape[-1]
        hidden = dim * self.ff_mult
        attn = dict(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            upcast=self.upcast_attention,
            dtype=self.dtype_policy,
        )
        self.norm1 = layers.LayerNormalization(
            epsilon=self.norm_eps, dtype=self.dtype_policy, name="norm1"
        )
        self.attn1 = Attention(**attn, name="attn1")
        self.norm2 = layers.LayerNormalization(
            epsilon=self.norm_eps, dtype=self.dtype_policy, name="norm2"
        )
        self.attn2 = Attention(**attn, name="attn2")
        self.norm3 = layers.LayerNormalization(
            epsilon=self.norm_eps, dtype=self.dtype_policy, name="norm3"
        )
        self.ff_proj = layers.Dense(2 * hidden, dtype=self.dtype_policy, name="ff-net-0-proj")
        self.ff_out = layers.Dense(dim, dtype=self.dtype_policy, name="ff-net-2")
        for norm in (self.norm1, self.norm2, self.norm3):
            norm.build(x_shape)
        self.attn1.build(x_shape)
        self.attn2.build(x_shape, context_shape)
        self.ff_proj.build(x_shape)
        self.ff_out.build((None, None, hidden))

    def call(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        value, gate = ops.split(self.ff_proj(self.norm3(x)), 2, axis=-1)  # GEGLU
        return x + self.ff_out(value * ops.gelu(gate, approximate=False))

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "norm_eps": self.norm_eps,
            "ff_mult": self.ff_mult,
            "upcast_attention": self.upcast_attention,
        }


@keras.saving.register_keras_serializable(package="keras_sd")
class Transformer2D(layers.Layer):
    """Spatial transformer (diffusers `Transformer2DModel`): image features attend to context.

    GroupNorm `norm`, projection `proj_in` to `num_heads * head_dim` channels,
    `transformer_blocks.{i}`, projection `proj_out` back, plus a residual. The
    projections are 1x1 convolutions (SD 1.x) or Dense layers (SD 2.x,
    `use_linear_projection=True`); the two are the same map, stored differently.

    Args:
        num_heads: attention heads.
        head_dim: channels per head.
        num_layers: transformer blocks.
        norm_groups: GroupNorm groups.
        use_linear_projection: Dense instead of 1x1 Conv2D projections.
        norm_eps: epsilon of the input GroupNorm.
        upcast_attention: see `Attention.upcast`.

    Returns:
        `call(x [B, H, W, C], context [B, S, D])` -> `[B, H, W, C]`.

    Example:
    >>> t = Transformer2D(num_heads=2, head_dim=16, norm_groups=8)
    >>> t.build((None, None, None, 32), (None, None, 24))
    >>> tuple(t(keras.ops.ones((1, 4, 4, 32)), keras.ops.ones((1, 7, 24))).shape)
    (1, 4, 4, 32)
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_layers: int = 1,
        norm_groups: int = 32,
        use_linear_projection: bool = False,
        norm_eps: float = 1e-6,
        upcast_attention: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.norm_groups = norm_groups
        self.use_linear_projection = use_linear_projection
        self.norm_eps = norm_eps
        self.upcast_attention = upcast_attention

    def _projection(self, units, name):
        if self.use_linear_projection:
            return layers.Dense(units, dtype=self.dtype_policy, name=name)
        return layers.Conv2D(units, 1, dtype=self.dtype_policy, name=name)

    def build(self, x_shape, context_shape):
        channels, inner = x_shape[-1], self.num_heads * self.head_dim
        self.norm = GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype_policy, name="norm")
        self.proj_in = self._projection(inner, "proj_in")
        self.transformer_blocks = [
            BasicTransformerBlock(
                self.num_heads,
                self.head_dim,
                upcast_attention=self.upcast_attention,
                dtype=self.dtype_policy,
                name=f"transformer_blocks-{i}",
            )
            for i in range(self.num_layers)
        ]
        self.proj_out = self._projection(channels, "proj_out")
        self.norm.build(x_shape)
        self.proj_in.build(x_shape)
        for block in self.transformer_blocks:
            block.build((None, None, inner), context_shape)
        self.proj_out.build(spatial_shape(inner))

    def call(self, x, context):
        b, h, w, _ = ops.shape(x)
        # proj_in is pointwise, so it can run before or after flattening: the
        # order below keeps one reshape on each side of the blocks.
        tokens = self.proj_in(self.norm(x))
        # Static widths, not -1: with an unknown batch (fit() on a partial last
        # batch) a -1 next to a dynamic dimension loses the channel count.
        inner = self.num_heads * self.head_dim
        tokens = ops.reshape(tokens, (b, h * w, inner))  # [B, HW, inner]
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = ops.reshape(tokens, (b, h, w, inner))
        return x + self.proj_out(tokens)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "num_layers": self.num_layers,
            "norm_groups": self.norm_groups,
            "use_linear_projection": self.use_linear_projection,
            "norm_eps": self.norm_eps,
            "upcast_attention": self.upcast_attention,
        }


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0):
    """Sinusoidal timestep features `[cos(t f), sin(t f)]` (diffusers `Timesteps` as SD uses it).

    Frequencies `f_i = max_period ** (-i / (dim // 2))` (flip_sin_to_cos=True,
    downscale_freq_shift=0); an odd `dim` gets a zero last column.

    Args:
        timesteps: `[B]` integer or float timesteps.
        dim: feature size.
        max_period: the longest period.

    Returns:
        `[B, dim]` float32.

    Example:
    >>> tuple(timestep_embedding(keras.ops.array([0, 500]), 8).shape)
    (2, 8)
    """
    half = dim // 2
    freqs = ops.exp(-math.log(max_period) * ops.arange(half, dtype="float32") / half)
    args = ops.cast(timesteps, "float32")[:, None] * freqs[None, :]  # [B, half]
    emb = ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        emb = ops.pad(emb, ((0, 0), (0, 1)))
    return emb


@keras.saving.register_keras_serializable(package="keras_sd")
class TimestepEmbedding(layers.Layer):
    """MLP on the sinusoidal timestep features: `linear_1`, SiLU, `linear_2`.

    Args:
        dim: output width (SD: 4x the first UNet block width).

    Returns:
        `[B, F]` -> `[B, dim]`.

    Example:
    >>> tuple(TimestepEmbedding(64)(keras.ops.ones((2, 16))).shape)
    (2, 64)
    """

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim

    def build(self, input_shape):
        self.linear_1 = layers.Dense(self.dim, dtype=self.dtype_policy, name="linear_1")
        self.linear_2 = layers.Dense(self.dim, dtype=self.dtype_policy, name="linear_2")
        self.linear_1.build(input_shape)
        self.linear_2.build((None, self.dim))

    def call(self, x):
        return self.linear_2(ops.silu(self.linear_1(x)))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}
