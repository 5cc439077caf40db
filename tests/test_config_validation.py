"""Model and scheduler configs are checked before anything is built: the configs of
issue-sized mistakes (10^5 layers, 4e8 training timesteps, lists for dicts, missing
keys, zero groups or heads) get a ValueError/TypeError naming the key, at once."""

import pytest

from keras_sd import StableDiffusion, presets
from keras_sd.models import clip_text, unet, vae
from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.models.validation import MAX_PARAMETERS, check_config, check_model_config
from keras_sd.schedulers import DDIMScheduler, KerasCVScheduler, build_scheduler


@pytest.mark.parametrize("name", sorted(presets.MODEL_CONFIGS))
def test_every_named_config_passes(name):
    config = presets.MODEL_CONFIGS[name]
    check_model_config(config)
    assert presets.resolve_model_config(name) == config


def test_sdxl_sized_unet_is_within_the_bounds():
    sdxl = {
        **unet.SD2_CONFIG,
        "block_out_channels": (320, 640, 1280),
        "attention_levels": (False, True, True),
        "num_heads": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
    }
    check_config("unet", sdxl)


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda: UNet(**{**unet.TINY_CONFIG, "layers_per_block": 10**5}), "layers_per_block"),
        (lambda: CLIPTextEncoder(**{**clip_text.TINY_CONFIG, "num_layers": 10**5}), "num_layers"),
        (lambda: VAEDecoder(**{**vae.TINY_CONFIG, "layers_per_block": 10**5}), "layers_per_block"),
        (lambda: UNet(**{**unet.TINY_CONFIG, "norm_num_groups": 0}), "norm_num_groups"),
        (lambda: UNet(**{**unet.TINY_CONFIG, "num_heads": 0}), "num_heads"),
        (lambda: UNet(**{**unet.TINY_CONFIG, "num_heads": (2, 0)}), "num_heads"),
        (lambda: VAEEncoder(**{**vae.TINY_CONFIG, "norm_num_groups": 0}), "norm_num_groups"),
        (lambda: CLIPTextEncoder(**{**clip_text.TINY_CONFIG, "num_heads": 0}), "num_heads"),
        (lambda: UNet(**{**unet.TINY_CONFIG, "block_out_channels": []}), "block_out_channels"),
        (lambda: UNet(**{**unet.TINY_CONFIG, "block_out_channels": 32}), "block_out_channels"),
        (lambda: UNet(**{**unet.TINY_CONFIG, "norm_eps": float("nan")}), "norm_eps"),
        (lambda: VAEDecoder(**{**vae.TINY_CONFIG, "scaling_factor": -1.0}), "scaling_factor"),
        (lambda: UNet(**{**unet.TINY_CONFIG, "in_channels": "4"}), "in_channels"),
        (lambda: UNet(**{**unet.TINY_CONFIG, "attention_levels": (True,)}), "attention_levels"),
    ],
)
def test_constructors_refuse_before_building(build, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        build()


def test_huge_models_are_refused_by_their_size_estimate():
    config = {**unet.TINY_CONFIG, "block_out_channels": (8192,) * 4, "num_heads": 64}
    config["attention_levels"] = (True,) * 4
    config["layers_per_block"] = 32
    with pytest.raises(ValueError, match="parameters") as error:
        UNet(**config)
    estimate = float(str(error.value).split("about ")[1].split(" ")[0])
    assert estimate > MAX_PARAMETERS


def tiny_with(component, value):
    return {**presets.resolve_model_config("tiny"), component: value}


@pytest.mark.parametrize(
    "config, error, needle",
    [
        ([("unet", {})], TypeError, "config must be a name or a dict"),
        (tiny_with("unet", [1, 2]), TypeError, "unet config must be a dict"),
        (tiny_with("scheduler", "ddim"), TypeError, "scheduler config must be a dict"),
        (
            tiny_with("unet", {k: v for k, v in unet.TINY_CONFIG.items() if k != "num_heads"}),
            ValueError,
            r"lacks the keys \['num_heads'\]",
        ),
        (
            tiny_with("text_encoder", {**clip_text.TINY_CONFIG, "hidden_dim": 64}),
            ValueError,
            "hidden_dim 64 != unet cross_attention_dim 32",
        ),
        (
            tiny_with("unet", {**unet.TINY_CONFIG, "in_channels": 5}),
            ValueError,
            "do not fit 4 VAE latent channels",
        ),
        (tiny_with("tokenizer", {"max_length": 10**9}), ValueError, "max_length"),
        (tiny_with("scheduler", {"num_train_timesteps": 4 * 10**8}), ValueError, "10000"),
    ],
)
def test_pipeline_configs_are_checked_as_a_whole(config, error, needle):
    with pytest.raises(error, match=needle):
        StableDiffusion(32, 32, config=config)


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"num_train_timesteps": 4 * 10**8}, "num_train_timesteps"),
        ({"num_train_timesteps": 4e8}, "num_train_timesteps"),
        ({"steps_offset": 1000}, "steps_offset"),
    ],
)
def test_scheduler_configs_are_bounded(settings, needle):
    with pytest.raises(ValueError, match=needle):
        DDIMScheduler(**settings)
    with pytest.raises(ValueError, match=needle):
        build_scheduler(settings)


def test_num_steps_limit_is_the_real_one():
    """Leading spacing with offset 1 visits timestep 1000 at 1000 steps, which does not
    exist: the limit says 999 and 999 runs; other spacings reach every timestep."""
    ddim = DDIMScheduler()
    assert ddim.max_num_steps() == 999
    assert ddim.schedule(999)["timesteps"].max() == 999
    with pytest.raises(ValueError, match="<= 999, got 1000"):
        ddim.check_num_steps(1000)
    for scheduler in (
        DDIMScheduler(steps_offset=0),
        DDIMScheduler(timestep_spacing="trailing"),
        KerasCVScheduler(),
    ):
        assert scheduler.max_num_steps() == 1000
        assert scheduler.schedule(1000)["timesteps"].max() == 999
