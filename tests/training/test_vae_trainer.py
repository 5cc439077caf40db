"""VAETrainer: fit() learns and the loss is reconstruction + weighted KL."""

import keras
import numpy as np
import pytest

from keras_sd.models import vae
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.training import VAETrainer


def make_trainer(**kwargs):
    keras.utils.set_random_seed(0)
    return VAETrainer(
        VAEEncoder(**vae.TINY_CONFIG), VAEDecoder(**vae.TINY_CONFIG), seed=0, **kwargs
    )


def images(n=4):
    rng = np.random.default_rng(0)
    # Smooth images (a colour per quadrant) so a few steps can fit them.
    quads = rng.uniform(-1, 1, (n, 2, 2, 3)).astype("float32")
    return np.repeat(np.repeat(quads, 8, axis=1), 8, axis=2)


def fixed_loss(trainer, x, seed=3):
    moments = trainer.encoder(x)
    noise = np.random.default_rng(seed).standard_normal((*moments.shape[:-1], 4))
    recon = trainer.decode_sample(moments, noise.astype("float32"))
    return float(keras.ops.convert_to_numpy(trainer.vae_loss(x, recon, moments)))


@pytest.mark.parametrize("reconstruction", ["mse", "l1"])
def test_loss_is_reconstruction_plus_weighted_kl(reconstruction):
    trainer = make_trainer(kl_weight=0.01, reconstruction=reconstruction)
    x = images()
    moments = keras.ops.convert_to_numpy(trainer.encoder(x)).astype(np.float64)
    mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30, 20)
    noise = np.random.default_rng(3).standard_normal(mean.shape)
    z = mean + np.exp(0.5 * logvar) * noise
    recon = keras.ops.convert_to_numpy(trainer.decoder(z.astype("float32")))
    error = recon - x
    rec = np.mean(error**2) if reconstruction == "mse" else np.mean(np.abs(error))
    kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3)).mean()
    assert fixed_loss(trainer, x) == pytest.approx(rec + 0.01 * kl, rel=1e-4)


def test_fit_reduces_loss_on_a_fixed_batch():
    trainer = make_trainer()
    x = images()
    before = fixed_loss(trainer, x)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
    trainer.fit({"images": x}, batch_size=4, epochs=20, verbose=0)
    after = fixed_loss(trainer, x)
    assert after < 0.5 * before, (before, after)


def test_config_round_trip_and_validation():
    trainer = make_trainer(kl_weight=1e-5, reconstruction="l1")
    assert VAETrainer.from_config(trainer.get_config()).get_config() == trainer.get_config()
    with pytest.raises(ValueError, match="reconstruction"):
        make_trainer(reconstruction="huber")
    with pytest.raises(ValueError, match="kl_weight"):
        make_trainer(kl_weight=-1.0)
