"""The spatial transformer of the UNet and the attention layer it shares with the VAE.

Sublayers carry diffusers' names (`to_q`, `attn1`, `ff.net.0.proj`, `proj_in`, ...),
so `keras_sd.weights.state_dict.named_variables` yields diffusers state-dict keys.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_sd.models.attention import dot_product_attention
from keras_sd.models.layers import GroupNorm, geglu, spatial_shape


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
        return x + self.ff_out(geglu(value, gate))

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
