"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) as encoder and decoder models.

Encoder: `conv_in` -> down levels (resnets, a stride-2 downsampler except on the
last level) -> mid block (resnet, single-head self-attention, resnet) -> GroupNorm,
SiLU, `conv_out` -> `quant_conv`, giving the mean and log-variance of the latent
distribution. Decoder: `post_quant_conv` -> `conv_in` -> mid block -> up levels
(one more resnet than the encoder, nearest x2 upsampler except on the last level)
-> GroupNorm, SiLU, `conv_out`.

Sublayers carry their full AutoencoderKL paths (`encoder.down_blocks.0.resnets.1`,
`decoder.mid_block.attentions.0`, `quant_conv`, ...), so loading either half is
filtering the AutoencoderKL state dict by the `encoder.` and `quant_conv.` (or
`decoder.` and `post_quant_conv.`) prefixes and calling `load_state_dict`.
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
    Upsample2D,
    spatial_shape,
)
from keras_sd.models.transformer import Attention

SD1_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
TINY_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "scaling_factor": 0.18215,
}


@keras.saving.register_keras_serializable(package="keras_sd")
class SpatialSelfAttention(Attention):
    """Single-head self-attention over pixels with a GroupNorm and a residual (the VAE mid block).

    Sublayers `group_norm`, `to_q`, `to_k`, `to_v` (with bias) and `to_out.0`.

    Args:
        norm_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.

    Returns:
        `[B, H, W, C]` -> `[B, H, W, C]`.

    Example:
    >>> attn = SpatialSelfAttention(norm_groups=8)
    >>> tuple(attn(keras.ops.ones((1, 4, 4, 32))).shape)
    (1, 4, 4, 32)
    """

    def __init__(self, norm_groups: int = 32, norm_eps: float = 1e-6, **kwargs):
        # One head as wide as the channels, which are known only in build().
        super().__init__(num_heads=1, head_dim=None, qkv_bias=True, **kwargs)
        self.norm_groups = norm_groups
        self.norm_eps = norm_eps

    def build(self, x_shape):
        self.head_dim = x_shape[-1]
        self.group_norm = GroupNorm(
            self.norm_groups, self.norm_eps, dtype=self.dtype_policy, name="group_norm"
        )
        self.group_norm.build(x_shape)
        super().build((None, None, x_shape[-1]))

    def call(self, x):
        b, h, w, c = ops.shape(x)
        tokens = ops.reshape(self.group_norm(x), (b, h * w, c))
        return x + ops.reshape(super().call(tokens), (b, h, w, c))

    def get_config(self):
        config = super().get_config()
        for key in ("num_heads", "head_dim", "qkv_bias"):
            config.pop(key)
        return {**config, "norm_groups": self.norm_groups, "norm_eps": self.norm_eps}


def upcasts(dtype=None, force_upcast: bool = True) -> bool:
    """Whether a VAE built with the dtype policy `dtype` (None: the global one) and
    `force_upcast` runs, and keeps its weights, in float32 instead.

    SD VAEs' activations outgrow float16 (65504) at larger sizes: NaN or black images.
    bfloat16 has float32's range and keeps its policy.

    Example:
    >>> upcasts("mixed_float16"), upcasts("float16", force_upcast=False), upcasts("bfloat16")
    (True, False, False)
    """
    policy = keras.dtype_policies.get(dtype or keras.config.dtype_policy())
    return bool(force_upcast) and policy.compute_dtype == "float16"


class _VAEBase(keras.Model):
    """Config, validation and the mid block shared by `VAEEncoder` and `VAEDecoder`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        latent_channels: int,
        block_out_channels,
        layers_per_block: int,
        scaling_factor: float,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        force_upcast: bool = True,
        **kwargs,
    ):
        validation.check_config("vae", locals())  # before anything is built
        if upcasts(kwargs.get("dtype"), force_upcast):
            kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.force_upcast = bool(force_upcast)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.block_out_channels = tuple(block_out_channels)
        self.layers_per_block = layers_per_block
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.scaling_factor = scaling_factor
        for channels in self.block_out_channels:
            if channels % norm_num_groups:
                raise ValueError(
                    f"block_out_channels {channels} not divisible by norm_num_groups "
                    f"{norm_num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _resnet(self, channels, name):
        return ResnetBlock(
            channels, self.norm_num_groups, self.norm_eps, dtype=self.dtype_policy, name=name
        )

    def _make_mid_block(self, prefix):
        channels = self.block_out_channels[-1]
        self.mid_resnets = [self._resnet(channels, f"{prefix}-resnets-{j}") for j in range(2)]
        self.mid_attention = SpatialSelfAttention(
            self.norm_num_groups,
            self.norm_eps,
            dtype=self.dtype_policy,
            name=f"{prefix}-attentions-0",
        )

    def _build_mid_block(self, in_channels):
        channels = self.block_out_channels[-1]
        self.mid_resnets[0].build(spatial_shape(in_channels))
        self.mid_attention.build(spatial_shape(channels))
        self.mid_resnets[1].build(spatial_shape(channels))

    def _mid_block(self, x):
        return self.mid_resnets[1](self.mid_attention(self.mid_resnets[0](x)))

    def get_config(self):
        return {
            **super().get_config(),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "scaling_factor": self.scaling_factor,
            "force_upcast": self.force_upcast,
        }


@backend.register_shareable
@keras.saving.register_keras_serializable(package="keras_sd")
class VAEEncoder(_VAEBase):
    """Image -> latent distribution (diffusers `Encoder` + `quant_conv`).

    Args:
        in_channels: image channels read by the encoder (3).
        out_channels: image channels written by the decoder (3). Encoder and
            decoder take the same arguments, so one config dict serves the pair.
        latent_channels: latent channels (4).
        block_out_channels: channels per resolution level, high to low resolution.
        layers_per_block: resnets per encoder level (decoder levels have one more).
        scaling_factor: multiplies latents before the UNet (SD: 0.18215); kept in
            the config for pipelines, not applied in `call`.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        force_upcast: run in float32 when the dtype policy computes in float16 (as
            diffusers' `force_upcast`), so large activations cannot overflow.

    Returns:
        `call(images [B, H, W, in_channels] in [-1, 1])` -> moments
        `[B, H/f, W/f, 2 * latent_channels]`: mean then log-variance, f = `downsample_factor`.

    Example:
    >>> from keras_sd.models.vae import VAEEncoder, TINY_CONFIG
    >>> tuple(VAEEncoder(**TINY_CONFIG)(keras.ops.zeros((1, 16, 16, 3))).shape)
    (1, 8, 8, 8)
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("name", "vae_encoder")
        super().__init__(*args, **kwargs)
        dt, channels = self.dtype_policy, self.block_out_channels
        self.conv_in = layers.Conv2D(
            channels[0], 3, padding="same", dtype=dt, name="encoder-conv_in"
        )
        self.down_resnets, self.downsamplers = [], []
        for i, out in enumerate(channels):
            prefix = f"encoder-down_blocks-{i}"
            self.down_resnets.append(
                [self._resnet(out, f"{prefix}-resnets-{j}") for j in range(self.layers_per_block)]
            )
            if i < len(channels) - 1:
                # padding=0: diffusers pads bottom/right only in the VAE.
                self.downsamplers.append(
                    Downsample2D(padding=0, dtype=dt, name=f"{prefix}-downsamplers-0")
                )
        self._make_mid_block("encoder-mid_block")
        self.conv_norm_out = GroupNorm(
            self.norm_num_groups, self.norm_eps, dtype=dt, name="encoder-conv_norm_out"
        )
        moments = 2 * self.latent_channels
        self.conv_out = layers.Conv2D(moments, 3, padding="same", dtype=dt, name="encoder-conv_out")
        self.quant_conv = layers.Conv2D(moments, 1, dtype=dt, name="quant_conv")
        self.build(spatial_shape(self.in_channels))

    def build(self, images_shape):
        self.conv_in.build(images_shape)
        channels = self.block_out_channels[0]
        for i, resnets in enumerate(self.down_resnets):
            for resnet in resnets:
                resnet.build(spatial_shape(channels))
                channels = resnet.out_channels
            if i < len(self.downsamplers):
                self.downsamplers[i].build(spatial_shape(channels))
        self._build_mid_block(channels)
        self.conv_norm_out.build(spatial_shape(channels))
        self.conv_out.build(spatial_shape(channels))
        self.quant_conv.build(spatial_shape(2 * self.latent_channels))

    def call(self, images):
        x = self.conv_in(images)
        for i, resnets in enumerate(self.down_resnets):
            for resnet in resnets:
                x = resnet(x)
            if i < len(self.downsamplers):
                x = self.downsamplers[i](x)
        x = self._mid_block(x)
        x = self.conv_out(ops.silu(self.conv_norm_out(x)))
        return self.quant_conv(x)


@backend.register_shareable
@keras.saving.register_keras_serializable(package="keras_sd")
class VAEDecoder(_VAEBase):
    """Latents -> image (`post_quant_conv` + diffusers `Decoder`).

    Args: as `VAEEncoder`.

    Returns:
        `call(latents [B, h, w, latent_channels])` (unscaled: divide SD latents by
        `scaling_factor` first) -> images `[B, h*f, w*f, out_channels]`, roughly in
        [-1, 1] and not clipped, f = `downsample_factor`.

    Example:
    >>> from keras_sd.models.vae import VAEDecoder, TINY_CONFIG
    >>> tuple(VAEDecoder(**TINY_CONFIG)(keras.ops.zeros((1, 8, 8, 4))).shape)
    (1, 16, 16, 3)
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("name", "vae_decoder")
        super().__init__(*args, **kwargs)
        dt, channels = self.dtype_policy, self.block_out_channels
        self.post_quant_conv = layers.Conv2D(
            self.latent_channels, 1, dtype=dt, name="post_quant_conv"
        )
        self.conv_in = layers.Conv2D(
            channels[-1], 3, padding="same", dtype=dt, name="decoder-conv_in"
        )
        self._make_mid_block("decoder-mid_block")
        self.up_resnets, self.upsamplers = [], []
        for u, out in enumerate(reversed(channels)):
            prefix = f"decoder-up_blocks-{u}"
            self.up_resnets.append(
                [
                    self._resnet(out, f"{prefix}-resnets-{j}")
                    for j in range(self.layers_per_block + 1)
                ]
            )
            if u < len(channels) - 1:
                self.upsamplers.append(Upsample2D(dtype=dt, name=f"{prefix}-upsamplers-0"))
        self.conv_norm_out = GroupNorm(
            self.norm_num_groups, self.norm_eps, dtype=dt, name="decoder-conv_norm_out"
        )
        self.conv_out = layers.Conv2D(
            self.out_channels, 3, padding="same", dtype=dt, name="decoder-conv_out"
        )
        self.build(spatial_shape(self.latent_channels))

    def build(self, latents_shape):
        self.post_quant_conv.build(latents_shape)
        self.conv_in.build(latents_shape)
        channels = self.block_out_channels[-1]
        self._build_mid_block(channels)
        for u, resnets in enumerate(self.up_resnets):
            for resnet in resnets:
                resnet.build(spatial_shape(channels))
                channels = resnet.out_channels
            if u < len(self.upsamplers):
                self.upsamplers[u].build(spatial_shape(channels))
        self.conv_norm_out.build(spatial_shape(channels))
        self.conv_out.build(spatial_shape(channels))

    def call(self, latents):
        x = self.conv_in(self.post_quant_conv(latents))
        x = self._mid_block(x)
        for u, resnets in enumerate(self.up_resnets):
            for resnet in resnets:
                x = resnet(x)
            if u < len(self.upsamplers):
                x = self.upsamplers[u](x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
_REQUIRED_VALUES = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


def config_from_diffusers(cfg: dict) -> dict:
    """Turn a diffusers `vae/config.json` (AutoencoderKL) dict into VAE constructor kwargs.

    Args:
        cfg: the parsed config.

    Returns:
        A dict of keyword arguments for `VAEEncoder` and `VAEDecoder`.

    Raises:
        ValueError: naming the first option or block type these models do not implement.

    Example:
    >>> import json
    >>> kwargs = config_from_diffusers(json.load(open("vae/config.json")))  # doctest: +SKIP
    >>> decoder = VAEDecoder(**kwargs)  # doctest: +SKIP
    """
    for key, allowed in _REQUIRED_VALUES.items():
        if key in cfg and cfg[key] != allowed:
            raise ValueError(f"Unsupported VAE config: {key}={cfg[key]!r} (only {allowed!r})")
    for key, allowed in _BLOCK_TYPES.items():
        for kind in cfg.get(key, ()):
            if kind != allowed:
                raise ValueError(
                    f"Unsupported VAE block type in {key}: {kind!r} (only {allowed!r})"
                )
    return {
        "in_channels": cfg.get("in_channels", 3),
        "out_channels": cfg.get("out_channels", 3),
        "latent_channels": cfg.get("latent_channels", 4),
        "block_out_channels": tuple(cfg["block_out_channels"]),
        "layers_per_block": cfg.get("layers_per_block", 1),
        "norm_num_groups": cfg.get("norm_num_groups", 32),
        "scaling_factor": cfg.get("scaling_factor", SD1_CONFIG["scaling_factor"]),
        **({"force_upcast": bool(cfg["force_upcast"])} if "force_upcast" in cfg else {}),
    }
