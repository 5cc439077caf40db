"""UNet against diffusers' UNet2DConditionModel with random weights."""

import json

import keras
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import (
    keras_model_from_state_dict,
    max_abs_normalized_error,
    random_torch_model,
    randomize_torch_module,
    torch_state_dict,
)
from keras_sd.models.unet import SD1_CONFIG, SD2_CONFIG, TINY_CONFIG, UNet, config_from_diffusers
from keras_sd.weights.state_dict import load_state_dict, named_variables

# Parity unit: max |keras - torch| / std(torch), float32 on both sides.
FLOAT32_TOLERANCE = 1e-4
# float16 activations keep ~3 significant digits; 2e-2 of the output std is far
# below what a wrong mapping or an overflow would give.
MIXED_FLOAT16_TOLERANCE = 2e-2
CONTEXT_LENGTH = 7

# Per-level heads (mid block uses the last level's), Dense projections, two
# transformer blocks on one level, three resolution levels.
LINEAR_CONFIG = {
    **TINY_CONFIG,
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 1,
    "attention_levels": (True, True, False),
    "num_heads": (2, 4, 2),
    "transformer_layers_per_block": (1, 2, 1),
    "cross_attention_dim": 24,
    "use_linear_projection": True,
}
INPAINT_CONFIG = {**TINY_CONFIG, "in_channels": 9}


def diffusers_unet(config: dict, seed: int = 0, std: float = 0.05) -> UNet2DConditionModel:
    """The diffusers UNet that describes the same network as our kwargs, randomised."""
    levels = len(config["block_out_channels"])
    attention = config["attention_levels"]
    heads = config["num_heads"]
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]),
        attention_head_dim=tuple(heads) if isinstance(heads, tuple) else heads,
        cross_attention_dim=config["cross_attention_dim"],
        transformer_layers_per_block=config.get("transformer_layers_per_block", 1),
        use_linear_projection=config["use_linear_projection"],
        norm_num_groups=config["norm_num_groups"],
        norm_eps=config["norm_eps"],
    ).eval()
    assert len(model.down_blocks) == levels
    randomize_torch_module(model, seed=seed, std=std)
    return model


def unet_inputs(config: dict, batch: int = 2, size: int = 8, length: int = CONTEXT_LENGTH):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((batch, size, size, config["in_channels"]), dtype=np.float32)
    timesteps = np.array([3, 999, 500, 1][:batch], dtype=np.int64)
    context = rng.standard_normal((batch, length, config["cross_attention_dim"]), dtype=np.float32)
    return latents, timesteps, context


def torch_reference(model, latents, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(latents).permute(0, 3, 1, 2),
            torch.from_numpy(timesteps),
            torch.from_numpy(context),
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def loaded_unet(torch_model, **kwargs) -> UNet:
    unet = UNet(**config_from_diffusers(dict(torch_model.config)), **kwargs)
    load_state_dict(unet, torch_state_dict(torch_model))
    return unet


def check_parity(config: dict, size: int = 8, length: int = CONTEXT_LENGTH, batch: int = 2):
    torch_model = diffusers_unet(config)
    inputs = unet_inputs(config, batch=batch, size=size, length=length)
    expected = torch_reference(torch_model, *inputs)
    unet = loaded_unet(torch_model)
    actual = keras.ops.convert_to_numpy(unet(*inputs))
    error = max_abs_normalized_error(actual, expected)
    assert error <= FLOAT32_TOLERANCE, error
    return unet, inputs, actual


@pytest.fixture(scope="module")
def tiny_pair():
    """(diffusers UNet, keras-sd UNet with its weights) for TINY_CONFIG, built once."""
    torch_model = diffusers_unet(TINY_CONFIG)
    return torch_model, loaded_unet(torch_model)


@pytest.mark.parametrize(
    "config", [TINY_CONFIG, LINEAR_CONFIG, INPAINT_CONFIG], ids=["tiny", "linear", "inpaint"]
)
def test_tiny_parity(config):
    check_parity(config)


def test_config_from_diffusers_inverts_test_mapping():
    for config in (TINY_CONFIG, LINEAR_CONFIG):
        kwargs = config_from_diffusers(dict(diffusers_unet(config).config))
        assert UNet(**kwargs).get_config() == UNet(**config).get_config()


def test_scalar_and_float_timesteps(tiny_pair):
    torch_model, unet = tiny_pair
    latents, _, context = unet_inputs(TINY_CONFIG)
    for timestep in (250, 250.5):
        expected = torch_reference(
            torch_model, latents, np.full((2,), timestep, dtype=np.float32), context
        )
        actual = keras.ops.convert_to_numpy(unet(latents, timestep, context))
        assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE


def test_mixed_float16_close_to_float32(tiny_pair):
    torch_model, float32_unet = tiny_pair
    inputs = unet_inputs(TINY_CONFIG)
    reference = keras.ops.convert_to_numpy(float32_unet(*inputs))
    unet = loaded_unet(torch_model, dtype="mixed_float16")
    out = unet(*inputs)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    out = keras.ops.convert_to_numpy(out).astype(np.float32)
    assert np.isfinite(out).all()
    assert max_abs_normalized_error(out, reference) <= MIXED_FLOAT16_TOLERANCE


def test_config_round_trip():
    unet = UNet(**LINEAR_CONFIG)
    config = json.loads(json.dumps(unet.get_config()))
    clone = UNet.from_config(config)
    assert clone.get_config() == unet.get_config()
    shapes = {k: tuple(v.shape) for k, v in named_variables(unet).items()}
    assert {k: tuple(v.shape) for k, v in named_variables(clone).items()} == shapes


# Configs as published in the `unet/config.json` of the diffusers checkpoints.
SD15_DIFFUSERS = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD21_DIFFUSERS = {
    **SD15_DIFFUSERS,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}


def test_config_from_diffusers_sd_configs():
    kwargs = config_from_diffusers(SD15_DIFFUSERS)
    assert {k: kwargs[k] for k in SD1_CONFIG} == SD1_CONFIG
    assert kwargs["upcast_attention"] is False
    kwargs = config_from_diffusers(SD21_DIFFUSERS)
    assert {k: kwargs[k] for k in SD2_CONFIG} == SD2_CONFIG
    assert kwargs["upcast_attention"] is True
    inpaint = config_from_diffusers({**SD15_DIFFUSERS, "in_channels": 9})
    assert inpaint["in_channels"] == 9


@pytest.mark.parametrize(
    "change, message",
    [
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "SimpleCrossAttnDownBlock2D"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"only_cross_attention": [True, False, False, False]}, "only_cross_attention"),
        ({"up_block_types": ["CrossAttnUpBlock2D"] * 4}, "mirror"),
    ],
)
def test_config_from_diffusers_rejects_unsupported(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_diffusers({**SD15_DIFFUSERS, **change})


def test_invalid_constructor_args():
    with pytest.raises(ValueError, match="num_heads"):
        UNet(**{**TINY_CONFIG, "num_heads": (2, 2, 2)})
    with pytest.raises(ValueError, match="divisible"):
        UNet(**{**TINY_CONFIG, "num_heads": 3})


@pytest.mark.slow
@pytest.mark.parametrize("config", [SD15_DIFFUSERS, SD21_DIFFUSERS], ids=["sd15", "sd21"])
def test_full_size_parity(config):
    # Smallest latent that reaches every level: 8x8 -> 4 -> 2 -> 1; one sample.
    kwargs = config_from_diffusers(config)
    torch_model = random_torch_model(
        lambda: UNet2DConditionModel.from_config(config).eval(), seed=0, std=0.02
    )
    inputs = unet_inputs(kwargs, batch=1, length=77)
    expected = torch_reference(torch_model, *inputs)
    unet = keras_model_from_state_dict(lambda: UNet(**kwargs), torch_state_dict(torch_model))
    del torch_model
    actual = keras.ops.convert_to_numpy(unet(*inputs))
    error = max_abs_normalized_error(actual, expected)
    assert error <= FLOAT32_TOLERANCE, error


def test_symbolic_call_with_unknown_batch_keeps_channels():
    """fit() traces with an unknown batch on a partial last batch; shapes must stay static."""
    import keras

    unet = UNet(**TINY_CONFIG)
    out = unet(
        keras.Input((8, 8, TINY_CONFIG["in_channels"])),
        keras.Input((), dtype="int32"),
        keras.Input((5, TINY_CONFIG["cross_attention_dim"])),
    )
    assert tuple(out.shape) == (None, 8, 8, TINY_CONFIG["out_channels"])
