"""VAEEncoder / VAEDecoder against diffusers' AutoencoderKL with random weights."""

import json

import keras
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from conftest import (
    max_abs_normalized_error,
    random_torch_model,
    randomize_torch_module,
    torch_state_dict,
)
from keras_sd.models.vae import (
    SD1_CONFIG,
    TINY_CONFIG,
    SpatialSelfAttention,
    VAEDecoder,
    VAEEncoder,
    config_from_diffusers,
)
from keras_sd.weights.state_dict import load_state_dict, named_variables

# Parity unit: max |keras - torch| / std(torch), float32 on both sides.
FLOAT32_TOLERANCE = 1e-4
# float16 activations keep ~3 significant digits; 2e-2 of the output std is far
# below what a wrong mapping or an overflow would give.
MIXED_FLOAT16_TOLERANCE = 2e-2
ENCODER_PREFIXES = ("encoder.", "quant_conv.")
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")

# Three levels, two resnets per level, 16-channel groups: every block type twice.
DEEPER_CONFIG = {**TINY_CONFIG, "block_out_channels": (16, 32, 32), "layers_per_block": 2}

# As published in the `vae/config.json` of the SD 1.5 / 2.1 diffusers checkpoints.
SD_DIFFUSERS = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def diffusers_vae(config: dict, seed: int = 0, std: float = 0.05) -> AutoencoderKL:
    """The AutoencoderKL that describes the same network as our kwargs, randomised."""
    levels = len(config["block_out_channels"])
    model = AutoencoderKL(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        latent_channels=config["latent_channels"],
        norm_num_groups=config["norm_num_groups"],
        scaling_factor=config["scaling_factor"],
    ).eval()
    randomize_torch_module(model, seed=seed, std=std)
    return model


def part_state_dict(model: AutoencoderKL, prefixes) -> dict:
    return {k: v for k, v in torch_state_dict(model).items() if k.startswith(prefixes)}


def loaded(cls, torch_model, **kwargs):
    model = cls(**{**config_from_diffusers(dict(torch_model.config)), **kwargs})
    prefixes = ENCODER_PREFIXES if cls is VAEEncoder else DECODER_PREFIXES
    load_state_dict(model, part_state_dict(torch_model, prefixes))
    return model


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def torch_moments(model: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    # Raw encoder output: `encode()` would clamp the log-variance.
    with torch.no_grad():
        return model.quant_conv(model.encoder(nchw(images))).permute(0, 2, 3, 1).numpy()


def torch_decode(model: AutoencoderKL, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.decode(nchw(latents)).sample.permute(0, 2, 3, 1).numpy()


def sample_images(config: dict, size: int, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.uniform(-1, 1, (batch, size, size, config["in_channels"])).astype(np.float32)


def sample_latents(config: dict, size: int, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(2)
    return rng.standard_normal((batch, size, size, config["latent_channels"]), dtype=np.float32)


def check_encoder(torch_model, config, image_size, batch=2, **kwargs):
    images = sample_images(config, image_size, batch)
    encoder = loaded(VAEEncoder, torch_model, **kwargs)
    actual = keras.ops.convert_to_numpy(encoder(images)).astype(np.float32)
    factor = encoder.downsample_factor
    assert actual.shape == (batch, image_size // factor, image_size // factor, 8)
    return actual, torch_moments(torch_model, images)


def check_decoder(torch_model, config, latent_size, batch=2, **kwargs):
    latents = sample_latents(config, latent_size, batch)
    decoder = loaded(VAEDecoder, torch_model, **kwargs)
    actual = keras.ops.convert_to_numpy(decoder(latents)).astype(np.float32)
    return actual, torch_decode(torch_model, latents)


@pytest.mark.parametrize("config", [TINY_CONFIG, DEEPER_CONFIG], ids=["tiny", "deeper"])
def test_encoder_parity(config):
    actual, expected = check_encoder(diffusers_vae(config), config, image_size=16)
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("config", [TINY_CONFIG, DEEPER_CONFIG], ids=["tiny", "deeper"])
def test_decoder_parity(config):
    actual, expected = check_decoder(diffusers_vae(config), config, latent_size=4)
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE


def test_mixed_float16_close_to_float32():
    # force_upcast=False: the float16 computation itself (the default runs in float32).
    half = {"dtype": "mixed_float16", "force_upcast": False}
    torch_model = diffusers_vae(TINY_CONFIG)
    moments, _ = check_encoder(torch_model, TINY_CONFIG, 16)
    moments16, _ = check_encoder(torch_model, TINY_CONFIG, 16, **half)
    images, _ = check_decoder(torch_model, TINY_CONFIG, 4)
    images16, _ = check_decoder(torch_model, TINY_CONFIG, 4, **half)
    for out16, out32 in ((moments16, moments), (images16, images)):
        assert np.isfinite(out16).all()
        assert max_abs_normalized_error(out16, out32) <= MIXED_FLOAT16_TOLERANCE


def test_float16_policy_upcasts_the_vae_so_large_activations_stay_finite():
    """Activations past float16's 65504 (as SD VAEs reach at large sizes): NaN/inf in
    float16, while the default force_upcast decodes in float32 like the reference."""
    torch_model = diffusers_vae(TINY_CONFIG)
    with torch.no_grad():
        torch_model.decoder.conv_in.weight.mul_(1e6)
    latents = sample_latents(TINY_CONFIG, 4)
    expected = torch_decode(torch_model, latents)
    assert np.isfinite(expected).all()
    plain = loaded(VAEDecoder, torch_model, dtype="mixed_float16", force_upcast=False)
    assert not np.isfinite(keras.ops.convert_to_numpy(plain(latents)).astype("float32")).all()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        guarded = loaded(VAEDecoder, torch_model)  # the global policy, default force_upcast
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert guarded.compute_dtype == "float32"
    actual = keras.ops.convert_to_numpy(guarded(latents))
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE
    bf16 = VAEDecoder(**{**TINY_CONFIG, "dtype": "mixed_bfloat16"})  # float32's range
    assert bf16.compute_dtype == "bfloat16"


@pytest.mark.parametrize("cls", [VAEEncoder, VAEDecoder])
def test_config_round_trip(cls):
    model = cls(**DEEPER_CONFIG)
    config = json.loads(json.dumps(model.get_config()))
    clone = cls.from_config(config)
    assert clone.get_config() == model.get_config()
    assert clone.downsample_factor == 4
    shapes = {k: tuple(v.shape) for k, v in named_variables(model).items()}
    assert {k: tuple(v.shape) for k, v in named_variables(clone).items()} == shapes


def test_spatial_self_attention_round_trip():
    layer = SpatialSelfAttention(norm_groups=4, name="attn")
    layer.build((None, None, None, 8))
    clone = SpatialSelfAttention.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_variables_cover_autoencoder_state_dict():
    torch_keys = set(torch_state_dict(diffusers_vae(TINY_CONFIG)))
    keras_keys = set(named_variables(VAEEncoder(**TINY_CONFIG)))
    keras_keys |= set(named_variables(VAEDecoder(**TINY_CONFIG)))
    assert keras_keys == torch_keys


def test_config_from_diffusers():
    assert config_from_diffusers(SD_DIFFUSERS) == SD1_CONFIG
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        config_from_diffusers({**SD_DIFFUSERS, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="use_quant_conv"):
        config_from_diffusers({**SD_DIFFUSERS, "use_quant_conv": False})


@pytest.mark.slow
def test_full_size_parity():
    # 64x64 images / 8x8 latents reach every level of the SD VAE; one sample.
    torch_model = random_torch_model(
        lambda: AutoencoderKL.from_config(SD_DIFFUSERS).eval(), seed=0, std=0.02
    )
    actual, expected = check_encoder(torch_model, SD1_CONFIG, image_size=64, batch=1)
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE
    actual, expected = check_decoder(torch_model, SD1_CONFIG, latent_size=8, batch=1)
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE
