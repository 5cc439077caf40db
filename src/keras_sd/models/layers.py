"""Convolutional building blocks shared by the UNet and the VAE: GroupNorm, the residual
block, down- and upsampling, and the timestep embedding; and the transformer's GEGLU.

Every layer is channels-last and names its sublayers after the matching
diffusers module (`norm1`, `conv1`, `time_emb_proj`, ...), so
`keras_sd.weights.state_dict.named_variables` yields diffusers state-dict keys.
Layers infer their input channels in `build()`; parents call `build()` with
shapes so a whole model is built at construction without a forward pass.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

from keras_sd import backend
from keras_sd.models.conv import Conv3x3, upsample_by_phases, upsample_conv3x3


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

    Where `keras_sd.models.conv.upsample_by_phases` says so, both are computed from the
    input at once by `keras_sd.models.conv.upsample_conv3x3` (same result up to rounding).

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
        if upsample_by_phases(x, self.compute_dtype):
            kernel = ops.cast(self.conv.kernel, x.dtype)
            return upsample_conv3x3(x, kernel) + ops.cast(self.conv.bias, x.dtype)
        b, h, w, c = ops.shape(x)
        # One broadcast + reshape copies the tensor once (two `repeat`s copy it twice).
        x = ops.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(ops.reshape(x, (b, h * 2, w * 2, c)))


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


def geglu(value, gate):
    """The gated GELU of SD's transformer feed-forward: `value * gelu(gate)`, GELU exact
    (the erf form, as diffusers' `GEGLU`).

    Low-precision inputs are multiplied out in float32 and rounded once: the erf of a
    bfloat16/float16 tensor has no fast CPU kernel in TensorFlow (it is evaluated
    element by element through float), and one float32 pass is both faster there and
    closer to the float32 result. float32 inputs keep `keras.ops.gelu` exactly.

    Args:
        value, gate: tensors of one shape and dtype (the two halves of the projection).

    Returns:
        A tensor of that shape and dtype.

    Example:
    >>> x = keras.ops.convert_to_tensor([[-1.0, 0.0, 2.0]])
    >>> [round(float(v), 4) for v in geglu(x, x)[0]]
    [0.1587, 0.0, 3.909]
    """
    if keras.backend.standardize_dtype(gate.dtype) == "float32":
        return value * ops.gelu(gate, approximate=False)
    gate = ops.cast(gate, "float32")
    gelu = gate * 0.5 * (1.0 + ops.erf(gate * math.sqrt(0.5)))
    return ops.cast(ops.cast(value, "float32") * gelu, value.dtype)
