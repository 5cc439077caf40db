"""CLIPTextEncoder against transformers' CLIPTextModel with random weights."""

import numpy as np
import pytest
import torch
from keras import ops
from transformers import CLIPTextConfig, CLIPTextModel

from conftest import (
    keras_model_from_state_dict,
    max_abs_normalized_error,
    random_torch_model,
    torch_state_dict,
)
from keras_sd.models.clip_text import (
    SD1_CONFIG,
    SD2_CONFIG,
    TINY_CONFIG,
    CLIPEncoderLayer,
    CLIPTextEncoder,
    config_from_transformers,
)

# Parity unit: max |keras - torch| / std(torch), float32 on both sides.
FLOAT32_TOLERANCE = 1e-4
# float16 activations keep ~3 significant digits; 2e-2 of the output std is
# far below what a wrong mapping or a float16 overflow would produce.
MIXED_FLOAT16_TOLERANCE = 2e-2
END_TOKEN_ID = 49407  # CLIP's <|endoftext|>; data for the test inputs only


def transformers_config(config: dict) -> CLIPTextConfig:
    """The CLIPTextConfig that describes the same network as our kwargs."""
    return CLIPTextConfig(
        vocab_size=config["vocab_size"],
        max_position_embeddings=config["max_length"],
        hidden_size=config["hidden_dim"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_heads"],
        intermediate_size=config["intermediate_dim"],
        hidden_act=config["activation"],
        layer_norm_eps=config["layer_norm_epsilon"],
    )


def reference_model(config: dict, std: float) -> CLIPTextModel:
    hf_config = transformers_config(config)
    hf_config._attn_implementation = "eager"  # plain matmul-softmax reference
    return random_torch_model(lambda: CLIPTextModel(hf_config).eval(), seed=0, std=std)


def checkpoint_state_dict(model: CLIPTextModel) -> dict:
    """State dict with keys as stored in a diffusers `text_encoder` file.

    transformers 5 drops the `text_model.` level from the module tree, while the
    checkpoint files on disk (and transformers 4) keep it.
    """
    return {
        (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in torch_state_dict(model).items()
    }


def token_ids(config: dict, batch: int = 2) -> np.ndarray:
    ids = np.random.RandomState(1).randint(0, config["vocab_size"], (batch, config["max_length"]))
    ids[:, 7] = END_TOKEN_ID  # a prompt end followed by padding-like random ids
    ids[0, -1] = END_TOKEN_ID
    return ids


def encoder_and_reference(config: dict, std: float = 0.1):
    model = reference_model(config, std)
    encoder = keras_model_from_state_dict(
        lambda: CLIPTextEncoder(**config),
        checkpoint_state_dict(model),
        prefix="text_model.",
        ignore=("position_ids",),
    )
    return encoder, model


def run_reference(model: CLIPTextModel, ids: np.ndarray, **kwargs):
    with torch.no_grad():
        return model(torch.from_numpy(ids), **kwargs)


GELU_TINY_CONFIG = {**TINY_CONFIG, "activation": "gelu"}


@pytest.mark.parametrize("config", [TINY_CONFIG, GELU_TINY_CONFIG], ids=["quick_gelu", "gelu"])
def test_matches_transformers(config):
    encoder, model = encoder_and_reference(config)
    ids = token_ids(config)
    expected = run_reference(model, ids).last_hidden_state.numpy()
    actual = ops.convert_to_numpy(encoder(ids))
    assert actual.shape == expected.shape
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE


def test_clip_skip_and_short_sequence_match_transformers():
    encoder, model = encoder_and_reference(TINY_CONFIG)
    ids = token_ids(TINY_CONFIG)
    # diffusers' clip_skip=1: penultimate block's output through the final layer norm.
    hidden = run_reference(model, ids, output_hidden_states=True).hidden_states[-2]
    with torch.no_grad():
        expected = model.final_layer_norm(hidden).numpy()
    actual = ops.convert_to_numpy(encoder(ids, clip_skip=1))
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE

    short = ids[:, :9]
    expected = run_reference(model, short).last_hidden_state.numpy()
    actual = ops.convert_to_numpy(encoder(short))
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE


def test_config_round_trip_gives_same_outputs():
    encoder = CLIPTextEncoder(**GELU_TINY_CONFIG, name="text_encoder")
    restored = CLIPTextEncoder.from_config(encoder.get_config())
    restored.set_weights(encoder.get_weights())
    assert restored.get_config() == encoder.get_config()
    ids = token_ids(GELU_TINY_CONFIG)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(restored(ids)), ops.convert_to_numpy(encoder(ids))
    )


def test_encoder_layer_config_round_trip():
    layer = CLIPEncoderLayer(16, 2, 24, activation="gelu", name="encoder.layers.3")
    layer.build((None, None, 16))
    restored = CLIPEncoderLayer.from_config(layer.get_config())
    restored.build((None, None, 16))
    restored.set_weights(layer.get_weights())
    assert restored.get_config() == layer.get_config()
    x = np.random.RandomState(2).normal(size=(2, 5, 16)).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(restored(x)), ops.convert_to_numpy(layer(x)))


def test_mixed_float16_is_finite_and_close_to_float32():
    encoder, _ = encoder_and_reference(TINY_CONFIG)
    half = CLIPTextEncoder(**TINY_CONFIG, dtype="mixed_float16")
    half.set_weights(encoder.get_weights())
    assert all(w.dtype == "float32" for w in half.weights)
    ids = token_ids(TINY_CONFIG)
    actual = half(ids)
    assert actual.dtype == "float16"
    actual = ops.convert_to_numpy(actual)
    assert np.isfinite(actual).all()
    expected = ops.convert_to_numpy(encoder(ids))
    assert max_abs_normalized_error(actual, expected) <= MIXED_FLOAT16_TOLERANCE


@pytest.mark.parametrize(
    "config", [SD1_CONFIG, SD2_CONFIG, TINY_CONFIG], ids=["sd1", "sd2", "tiny"]
)
def test_config_from_transformers(config):
    hf_config = transformers_config(config)
    assert config_from_transformers(hf_config.to_dict()) == config
    # Saved config.json files omit fields equal to transformers' defaults.
    assert config_from_transformers(hf_config.to_diff_dict()) == config


def test_config_from_transformers_rejects_unsupported_values():
    cfg = transformers_config(TINY_CONFIG).to_dict()
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        config_from_transformers({**cfg, "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="num_attention_heads=5"):
        config_from_transformers({**cfg, "num_attention_heads": 5})


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation='relu'"):
        CLIPTextEncoder(**{**TINY_CONFIG, "activation": "relu"})
    encoder = CLIPTextEncoder(**TINY_CONFIG)
    with pytest.raises(ValueError, match="max_length=77"):
        encoder(np.zeros((1, 78), "int32"))
    with pytest.raises(ValueError, match="clip_skip=2"):
        encoder(np.zeros((1, 77), "int32"), clip_skip=2)


@pytest.mark.slow
@pytest.mark.parametrize("config", [SD1_CONFIG, SD2_CONFIG], ids=["sd1", "sd2"])
def test_full_size_matches_transformers(config):
    encoder, model = encoder_and_reference(config, std=0.02)
    ids = token_ids(config, batch=1)
    expected = run_reference(model, ids).last_hidden_state.numpy()
    actual = ops.convert_to_numpy(encoder(ids))
    assert max_abs_normalized_error(actual, expected) <= FLOAT32_TOLERANCE
