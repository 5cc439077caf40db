"""The Stable Diffusion UNet (diffusers `UNet2DConditionModel`, SD 1.x and 2.x), channels-last.

Data flow: `conv_in` -> down levels (resnets, optional cross-attention
transformers, a stride-2 downsampler except on the last level; every output is
kept as a skip) -> mid block -> up levels (one more resnet than the down side,
each consuming a skip, nearest x2 upsampler except on the last level) ->
GroupNorm, SiLU, `conv_out`. The timestep enters every resnet through a
sinusoidal embedding and an MLP.

Sublayers are named with their full diffusers paths (`down_blocks.1.attentions.0`,
`mid_block.resnets.1`, ...), so the layer tree is flat and one `call` reads top to
bottom, while `named_variables(unet)` yields the diffusers state-dict keys.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_sd import backend
from keras_sd.models import validation
from keras_sd.models.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock,
    TimestepEmbedding,
    Upsample2D,
    spatial_shape,
    timestep_embedding,
)
from keras_sd.models.transformer import Transformer2D

SD1_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_levels": (True, True, True, False),
    "num_heads": 8,
    "cross_attention_dim": 768,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}
# SD 2.x uses 64-channel heads: 320/64, 640/64, 1280/64 heads per level.
SD2_CONFIG = {
    **SD1_CONFIG,
    "num_heads": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
TINY_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "attention_levels": (True, False),
    "num_heads": 2,
    "cross_attention_dim": 32,
    "use_linear_projection": False,
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
}


def _per_level(value, levels: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels:
        raise ValueError(f"{name} must be one value or one per level ({levels}); got {value!r}")
    return values


@backend.register_shareable
@keras.saving.register_keras_serializable(package="keras_sd")
class UNet(keras.Model):
    """Noise-prediction UNet of Stable Diffusion 1.x / 2.x (diffusers `UNet2DConditionModel`).

    Args:
        in_channels: latent channels in (4; 9 for inpainting models, which take
            latents, the mask and the masked-image latents concatenated).
        out_channels: channels predicted (4).
        block_out_channels: channels of each resolution level, high to low.
        layers_per_block: resnets per down level (up levels have one more).
        attention_levels: per level, whether it has cross-attention transformers
            (diffusers `CrossAttnDownBlock2D` vs `DownBlock2D`); the mid block always has one.
        num_heads: attention heads, one int or one per level; the head width is
            `block_out_channels[i] // num_heads[i]`, and the mid block uses the last
            level's. Diffusers configs call this `attention_head_dim` (a misnomer:
            SD 1.x `8` means 8 heads of 40-160 channels, SD 2.x `[5, 10, 20, 20]`
            means 64-channel heads); `config_from_diffusers` maps it.
        cross_attention_dim: width of the text context.
        transformer_layers_per_block: transformer blocks per attention, int or per level.
        use_linear_projection: Dense (SD 2.x) instead of 1x1 conv (SD 1.x)
            transformer projections.
        upcast_attention: float32 attention under float16 (SD 2.x 768 models).
        norm_num_groups: GroupNorm groups everywhere.
        norm_eps: epsilon of the resnet and output GroupNorms.

    Returns:
        `call(latents [B, h, w, in_channels], timesteps [B] or scalar, context [B, L, D])`
        -> `[B, h, w, out_channels]`; h and w must be divisible by
        `2 ** (len(block_out_channels) - 1)`.

    Example:
    >>> from keras_sd.models.unet import UNet, TINY_CONFIG
    >>> unet = UNet(**TINY_CONFIG)
    >>> eps = unet(keras.ops.zeros((1, 8, 8, 4)), 10, keras.ops.zeros((1, 7, 32)))
    >>> tuple(eps.shape)
    (1, 8, 8, 4)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels,
        layers_per_block: int,
        attention_levels,
        num_heads,
        cross_attention_dim: int,
        transformer_layers_per_block=1,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        **kwargs,
    ):
        validation.check_config("unet", locals())  # before anything is built
        kwargs.setdefault("name", "unet")
        super().__init__(**kwargs)
        levels = len(block_out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.block_out_channels = tuple(block_out_channels)
        self.layers_per_block = layers_per_block
        self.attention_levels = tuple(
            bool(a) for a in _per_level(attention_levels, levels, "attention_levels")
        )
        self.num_heads = _per_level(num_heads, levels, "num_heads")
        self.cross_attention_dim = cross_attention_dim
        self.transformer_layers_per_block = _per_level(
            transformer_layers_per_block, levels, "transformer_layers_per_block"
        )
        self.use_linear_projection = use_linear_projection
        self.upcast_attention = upcast_attention
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        for channels, heads in zip(self.block_out_channels, self.num_heads, strict=True):
            if channels % heads or channels % norm_num_groups:
                raise ValueError(
                    f"block_out_channels {channels} must be divisible by its num_heads ({heads}) "
                    f"and norm_num_groups ({norm_num_groups})"
                )

        dt = self.dtype_policy
        first = self.block_out_channels[0]
        self.conv_in = layers.Conv2D(first, 3, padding="same", dtype=dt, name="conv_in")
        # diffusers: time embedding width = 4x the first level's channels.
        self.time_embedding = TimestepEmbedding(4 * first, dtype=dt, name="time_embedding")
        self.down_resnets, self.down_attentions, self.downsamplers = [], [], []
        for i in range(levels):
            prefix = f"down_blocks-{i}"
            self.down_resnets.append(self._resnets(i, layers_per_block, prefix))
            self.down_attentions.append(self._attentions(i, layers_per_block, prefix))
            if i < levels - 1:
                self.downsamplers.append(
                    Downsample2D(padding=1, dtype=dt, name=f"{prefix}-downsamplers-0")
                )
        self.mid_resnets = self._resnets(levels - 1, 2, "mid_block")
        self.mid_attention = self._transformer(levels - 1, "mid_block-attentions-0")
        self.up_resnets, self.up_attentions, self.upsamplers = [], [], []
        for u, level in enumerate(reversed(range(levels))):
            prefix = f"up_blocks-{u}"
            self.up_resnets.append(self._resnets(level, layers_per_block + 1, prefix))
            self.up_attentions.append(self._attentions(level, layers_per_block + 1, prefix))
            if u < levels - 1:
                self.upsamplers.append(Upsample2D(dtype=dt, name=f"{prefix}-upsamplers-0"))
        self.conv_norm_out = GroupNorm(norm_num_groups, norm_eps, dtype=dt, name="conv_norm_out")
        self.conv_out = layers.Conv2D(out_channels, 3, padding="same", dtype=dt, name="conv_out")
        self.build(spatial_shape(in_channels))

    def _resnets(self, level, count, prefix):
        return [
            ResnetBlock(
                self.block_out_channels[level],
                self.norm_num_groups,
                self.norm_eps,
                dtype=self.dtype_policy,
                name=f"{prefix}-resnets-{j}",
            )
            for j in range(count)
        ]

    def _transformer(self, level, name):
        heads = self.num_heads[level]
        return Transformer2D(
            heads,
            self.block_out_channels[level] // heads,
            num_layers=self.transformer_layers_per_block[level],
            norm_groups=self.norm_num_groups,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            dtype=self.dtype_policy,
            name=name,
        )

    def _attentions(self, level, count, prefix):
        if not self.attention_levels[level]:
            return []
        return [self._transformer(level, f"{prefix}-attentions-{j}") for j in range(count)]

    def build(self, latents_shape, timesteps_shape=None, context_shape=None):
        # Walk the network as `call` does, tracking channel counts (and the skip
        # stack) so every sublayer is built with its input shape.
        first = self.block_out_channels[0]
        temb = (None, self.time_embedding.dim)
        context = (None, None, self.cross_attention_dim)
        self.conv_in.build(latents_shape)
        self.time_embedding.build((None, first))
        channels, skips = first, [first]

        def resnet_then_attention(resnet, attention, in_channels):
            resnet.build(spatial_shape(in_channels), temb)
            if attention is not None:
                attention.build(spatial_shape(resnet.out_channels), context)
            return resnet.out_channels

        for i, resnets in enumerate(self.down_resnets):
            attentions = self.down_attentions[i] or [None] * len(resnets)
            for resnet, attention in zip(resnets, attentions, strict=True):
                channels = resnet_then_attention(resnet, attention, channels)
                skips.append(channels)
            if i < len(self.downsamplers):
                self.downsamplers[i].build(spatial_shape(channels))
                skips.append(channels)
        resnet_then_attention(self.mid_resnets[0], self.mid_attention, channels)
        self.mid_resnets[1].build(spatial_shape(channels), temb)
        for u, resnets in enumerate(self.up_resnets):
            attentions = self.up_attentions[u] or [None] * len(resnets)
            for resnet, attention in zip(resnets, attentions, strict=True):
                channels = resnet_then_attention(resnet, attention, channels + skips.pop())
            if u < len(self.upsamplers):
                self.upsamplers[u].build(spatial_shape(channels))
        self.conv_norm_out.build(spatial_shape(channels))
        self.conv_out.build(spatial_shape(channels))

    def __call__(self, latents, timesteps, context, **kwargs):
        # Keras accepts only tensors as positional arguments; let `unet(x, 10, ctx)` work.
        if isinstance(timesteps, (int, float)):
            timesteps = ops.convert_to_tensor(timesteps, "float32")
        return super().__call__(latents, timesteps, context, **kwargs)

    def call(self, latents, timesteps, context):
        batch = ops.shape(latents)[0]
        timesteps = ops.broadcast_to(ops.reshape(timesteps, (-1,)), (batch,))
        features = timestep_embedding(timesteps, self.block_out_channels[0])
        return self.call_with_timestep_features(latents, features, context)

    def call_with_timestep_features(self, latents, features, context):
        """`call` from precomputed sinusoidal timestep features `[B, block_out_channels[0]]`
        (`keras_sd.models.layers.timestep_embedding`), the input KerasCV's UNet takes."""
        temb = self.time_embedding(features)
        x = self.conv_in(latents)
        skips = [x]
        for i, resnets in enumerate(self.down_resnets):
            for j, resnet in enumerate(resnets):
                x = resnet(x, temb)
                if self.down_attentions[i]:
                    x = self.down_attentions[i][j](x, context)
                skips.append(x)
            if i < len(self.downsamplers):
                x = self.downsamplers[i](x)
                skips.append(x)
        x = self.mid_resnets[0](x, temb)
        x = self.mid_attention(x, context)
        x = self.mid_resnets[1](x, temb)
        for u, resnets in enumerate(self.up_resnets):
            for j, resnet in enumerate(resnets):
                x = resnet(ops.concatenate([x, skips.pop()], axis=-1), temb)
                if self.up_attentions[u]:
                    x = self.up_attentions[u][j](x, context)
            if u < len(self.upsamplers):
                x = self.upsamplers[u](x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))

    def get_config(self):
        return {
            **super().get_config(),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "attention_levels": list(self.attention_levels),
            "num_heads": list(self.num_heads),
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
        }


# diffusers options we do not implement, with the only value we accept for each.
_REQUIRED_VALUES = {
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def config_from_diffusers(cfg: dict) -> dict:
    """Turn a diffusers `unet/config.json` dict into `UNet` constructor kwargs.

    Args:
        cfg: the parsed config of a `UNet2DConditionModel`.

    Returns:
        A dict of `UNet` keyword arguments.

    Raises:
        ValueError: naming the first option whose value `UNet` does not implement
            (block types, class/addition embeddings, time-scale-shift resnets, ...).

    Example:
    >>> import json
    >>> kwargs = config_from_diffusers(json.load(open("unet/config.json")))  # doctest: +SKIP
    >>> unet = UNet(**kwargs)  # doctest: +SKIP
    """
    for key, allowed in _REQUIRED_VALUES.items():
        if key in cfg and cfg[key] != allowed:
            raise ValueError(f"Unsupported UNet config: {key}={cfg[key]!r} (only {allowed!r})")
    only_cross = cfg.get("only_cross_attention", False)
    if any(only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]):
        raise ValueError(f"Unsupported UNet config: only_cross_attention={only_cross!r}")
    for key in ("layers_per_block", "cross_attention_dim"):
        if isinstance(cfg.get(key), (list, tuple)):
            raise ValueError(f"Unsupported UNet config: per-level {key}={cfg[key]!r}")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for kind in down:
        if kind not in _DOWN_TYPES:
            raise ValueError(f"Unsupported down block type {kind!r} (only {sorted(_DOWN_TYPES)})")
    for kind in up:
        if kind not in _UP_TYPES:
            raise ValueError(f"Unsupported up block type {kind!r} (only {sorted(_UP_TYPES)})")
    attention_levels = [_DOWN_TYPES[kind] for kind in down]
    if [_UP_TYPES[kind] for kind in reversed(up)] != attention_levels:
        raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
    # diffusers: `num_attention_heads or attention_head_dim`, both meaning heads.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    return {
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "block_out_channels": tuple(cfg["block_out_channels"]),
        "layers_per_block": cfg.get("layers_per_block", 2),
        "attention_levels": tuple(attention_levels),
        "num_heads": tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        "cross_attention_dim": cfg["cross_attention_dim"],
        "transformer_layers_per_block": cfg.get("transformer_layers_per_block", 1),
        "use_linear_projection": cfg.get("use_linear_projection", False),
        "upcast_attention": cfg.get("upcast_attention", False),
        "norm_num_groups": cfg.get("norm_num_groups", 32),
        "norm_eps": cfg.get("norm_eps", 1e-5),
    }
