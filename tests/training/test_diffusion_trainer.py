"""DiffusionTrainer: fit() learns, the loss is the stated MSE, dropout rate, frozen VAE."""

import keras
import numpy as np
import pytest

from keras_sd.models import clip_text, unet, vae
from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEEncoder
from keras_sd.schedulers import DDIMScheduler
from keras_sd.training import DiffusionTrainer

LENGTH = 8
UNCOND = np.array([1, 2] + [2] * (LENGTH - 2), np.int32)


def make_trainer(prediction_type="epsilon", **kwargs):
    keras.utils.set_random_seed(0)
    text = CLIPTextEncoder(**{**clip_text.TINY_CONFIG, "vocab_size": 64, "max_length": LENGTH})
    kwargs.setdefault("unconditional_token_ids", UNCOND)
    return DiffusionTrainer(
        text,
        UNet(**unet.TINY_CONFIG),
        VAEEncoder(**vae.TINY_CONFIG),
        DDIMScheduler(prediction_type=prediction_type),
        seed=1,
        **kwargs,
    )


def batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((n, 8, 8, 4)).astype("float32"),
        "token_ids": rng.integers(3, 64, (n, LENGTH)).astype("int32"),
    }


def fixed_loss(trainer, data, seed=5):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(data["latents"].shape).astype("float32")
    timesteps = np.array([10, 300, 600, 900], np.int32)
    prediction, target = trainer.predict_and_target(
        data["latents"], data["token_ids"], noise, timesteps
    )
    return float(keras.ops.convert_to_numpy(trainer.diffusion_loss(prediction, target)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_hand_computed_mse(prediction_type):
    trainer = make_trainer(prediction_type)
    data = batch()
    rng = np.random.default_rng(5)
    noise = rng.standard_normal(data["latents"].shape).astype("float32")
    timesteps = np.array([10, 300, 600, 900], np.int32)
    alpha = trainer.scheduler.alphas_cumprod[timesteps][:, None, None, None].astype(np.float64)
    x0 = data["latents"].astype(np.float64)
    noisy = np.sqrt(alpha) * x0 + np.sqrt(1 - alpha) * noise
    context = trainer.text_encoder(data["token_ids"])
    prediction = keras.ops.convert_to_numpy(
        trainer.unet(noisy.astype("float32"), timesteps, context)
    )
    if prediction_type == "epsilon":
        target = noise
    else:
        target = np.sqrt(alpha) * noise - np.sqrt(1 - alpha) * x0
    expected = np.mean((prediction - target) ** 2)
    assert fixed_loss(trainer, data) == pytest.approx(expected, rel=1e-4)


def test_fit_reduces_loss_on_a_fixed_batch():
    trainer = make_trainer(condition_dropout=0.0)
    data = batch()
    before = fixed_loss(trainer, data)
    trainer.compile(optimizer=keras.optimizers.Adam(2e-3))
    assert trainer.optimizer.built  # at compile, not inside the first traced step
    traces = []
    step = trainer.train_step
    object.__setattr__(trainer, "train_step", lambda *args: traces.append(1) or step(*args))
    trainer.fit(data, batch_size=4, epochs=15, verbose=0)
    after = fixed_loss(trainer, data)
    assert after < 0.8 * before, (before, after)
    if keras.backend.backend() == "tensorflow":  # 15 steps of one compiled step, traced once
        assert len(traces) == 1, len(traces)


def test_condition_dropout_replaces_ids_at_the_stated_rate():
    trainer = make_trainer(condition_dropout=0.3)
    ids = np.random.default_rng(0).integers(3, 64, (4000, LENGTH)).astype("int32")
    out = keras.ops.convert_to_numpy(trainer.drop_condition(ids))
    dropped = np.all(out == UNCOND, axis=1)
    kept = np.all(out == ids, axis=1)
    assert np.all(dropped | kept)  # a row is either the empty prompt or untouched
    assert abs(dropped.mean() - 0.3) < 0.03  # 4000 draws: std of the rate is 0.007
    assert np.array_equal(
        keras.ops.convert_to_numpy(make_trainer(condition_dropout=0.0).drop_condition(ids)), ids
    )


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_fit_updates_unet_not_vae(train_text_encoder):
    trainer = make_trainer(train_text_encoder=train_text_encoder)
    rng = np.random.default_rng(0)
    data = {
        "images": rng.uniform(-1, 1, (4, 16, 16, 3)).astype("float32"),
        "token_ids": rng.integers(3, 64, (4, LENGTH)).astype("int32"),
    }
    weights = {
        name: [np.copy(w) for w in model.get_weights()]
        for name, model in (
            ("vae", trainer.vae_encoder),
            ("unet", trainer.unet),
            ("text", trainer.text_encoder),
        )
    }
    # Eagerly: which variables train does not depend on compilation, and tracing the
    # train step takes a minute on 2 cores (fit on a compiled step is tested above).
    # One step: Adam moves every weight that has a gradient by about the learning rate.
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    trainer.fit(data, batch_size=4, epochs=1, verbose=0)

    def changed(name, model):
        return any(
            not np.array_equal(a, b)
            for a, b in zip(weights[name], model.get_weights(), strict=True)
        )

    assert not changed("vae", trainer.vae_encoder)
    assert changed("unet", trainer.unet)
    assert changed("text", trainer.text_encoder) == train_text_encoder


def test_config_round_trip_and_validation():
    trainer = make_trainer(condition_dropout=0.2)
    clone = DiffusionTrainer.from_config(trainer.get_config())
    assert clone.get_config() == trainer.get_config()
    with pytest.raises(ValueError, match="unconditional_token_ids"):
        make_trainer(unconditional_token_ids=None)
    with pytest.raises(ValueError, match="condition_dropout"):
        make_trainer(condition_dropout=1.5)
    with pytest.raises(ValueError, match="snr_gamma"):
        make_trainer(snr_gamma=0.0)
    weighted = make_trainer(snr_gamma=5.0)
    assert DiffusionTrainer.from_config(weighted.get_config()).snr_gamma == 5.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type):
    """Min-SNR-gamma weights vs diffusers' compute_snr on its own DDPMScheduler tables."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    reference = diffusers.DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    timesteps = np.array([0, 1, 10, 150, 400, 700, 999], np.int32)
    snr = compute_snr(reference, torch.from_numpy(timesteps).long()).double().numpy()
    clipped = np.minimum(snr, 5.0)
    expected = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    trainer = make_trainer(prediction_type, snr_gamma=5.0)
    got = keras.ops.convert_to_numpy(trainer.loss_weights(timesteps))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[0] < 0.01 and got[-1] == pytest.approx(
        1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1), rel=1e-5
    )

    # The weighted loss is the weighted mean of per-example mean squared errors.
    rng = np.random.default_rng(3)
    prediction = rng.standard_normal((7, 4, 4, 2)).astype("float32")
    target = rng.standard_normal((7, 4, 4, 2)).astype("float32")
    per_example = np.mean((prediction - target) ** 2, axis=(1, 2, 3))
    loss = trainer.diffusion_loss(prediction, target, got)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(
        np.mean(per_example * expected), rel=1e-5
    )
    assert "loss_weight" in trainer(batch(), training=True)
