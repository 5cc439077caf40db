"""`VAETrainer`: trains a `VAEEncoder`/`VAEDecoder` pair as a KL-regularised autoencoder.

Loss = reconstruction (MSE or L1, mean over pixels) + `kl_weight` * KL(q(z|x) || N(0, I))
(summed over latent elements, averaged over the batch), the objective of the latent
diffusion autoencoder without its perceptual and adversarial terms (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3 and app. G).

The trainer overrides `call` and `compute_loss` only, never `train_step`, so the built-in
`fit()` of every Keras backend (TensorFlow, JAX, PyTorch) trains it.
"""

from __future__ import annotations

import importlib

import keras
from keras import ops

from keras_sd.training.base import Trainer

RECONSTRUCTION_LOSSES = ("mse", "l1")
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range so that
# exp() can neither overflow nor vanish early in training.
_LOGVAR_RANGE = (-30.0, 20.0)


def split_moments(moments):
    """(mean, logvar) from encoder moments [B, h, w, 2C] (mean first), float32, logvar clamped."""
    moments = ops.cast(moments, "float32")
    mean, logvar = ops.split(moments, 2, axis=-1)
    return mean, ops.clip(logvar, *_LOGVAR_RANGE)


def sample_posterior(moments, noise):
    """A reparameterised sample z = mean + exp(logvar / 2) * noise of q(z|x), float32.

    Args:
        moments: encoder output [B, h, w, 2C].
        noise: standard normal [B, h, w, C].

    Example:
    >>> import numpy as np
    >>> moments = np.concatenate([np.ones((1, 1, 1, 1)), np.zeros((1, 1, 1, 1))], -1)
    >>> float(sample_posterior(moments, np.full((1, 1, 1, 1), 2.0))[0, 0, 0, 0])  # 1 + 1 * 2
    3.0
    """
    mean, logvar = split_moments(moments)
    return mean + ops.exp(0.5 * logvar) * ops.cast(noise, "float32")


def kl_divergence(moments):
    """KL(N(mean, var) || N(0, I)) per example, summed over latent elements: [B] float32.

    Kingma & Welling 2014 ("Auto-Encoding Variational Bayes"), appendix B:
    -KL = 1/2 * sum(1 + logvar - mean^2 - var).

    Example:
    >>> import numpy as np
    >>> float(kl_divergence(np.zeros((1, 2, 2, 8), "float32"))[0])  # N(0, I) itself
    0.0
    """
    mean, logvar = split_moments(moments)
    per_element = ops.square(mean) + ops.exp(logvar) - 1.0 - logvar
    return 0.5 * ops.sum(ops.reshape(per_element, (ops.shape(mean)[0], -1)), axis=-1)


def serialize_component(obj) -> dict:
    """{"module", "class_name", "config"} of a model or scheduler, for trainer configs.

    Keras' registry is not used because not every keras-sd class registers itself.
    """
    cls = type(obj)
    return {"module": cls.__module__, "class_name": cls.__name__, "config": obj.get_config()}


def deserialize_component(spec: dict):
    """Rebuild an object from `serialize_component` output."""
    cls = getattr(importlib.import_module(spec["module"]), spec["class_name"])
    return cls.from_config(spec["config"])


def _images(inputs):
    return inputs["images"] if isinstance(inputs, dict) else inputs


class VAETrainer(Trainer):
    """Trains a VAE encoder and decoder with `fit()` on any backend.

    Args:
        encoder: a `VAEEncoder` (its output is the mean and log-variance).
        decoder: a `VAEDecoder` with the same latent channels.
        kl_weight: weight of the KL term; small (1e-6 in latent diffusion) so the
            latents stay informative while their scale stays bounded.
        reconstruction: "mse" or "l1".
        seed: seed of the posterior-sampling noise.
        **kwargs: base `keras.Model` arguments (`name`, ...).

    Returns (call):
        `call(images [B, H, W, 3] in [-1, 1] or {"images": ...})` -> dict with
        "reconstruction" [B, H, W, 3] and "moments" [B, h, w, 2C].

    Example:
    >>> from keras_sd.models.vae import VAEDecoder, VAEEncoder, TINY_CONFIG
    >>> trainer = VAETrainer(VAEEncoder(**TINY_CONFIG), VAEDecoder(**TINY_CONFIG))
    >>> trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> images = keras.ops.zeros((4, 16, 16, 3))  # in [-1, 1]
    >>> history = trainer.fit(images, batch_size=4, epochs=1, verbose=0)
    >>> len(history.history["loss"])
    1
    """

    def __init__(
        self,
        encoder,
        decoder,
        kl_weight: float = 1e-6,
        reconstruction: str = "mse",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction must be one of {RECONSTRUCTION_LOSSES}; "
                f"received {reconstruction!r}."
            )
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0; received {kl_weight!r}.")
        self.encoder = encoder
        self.decoder = decoder
        self.kl_weight = float(kl_weight)
        self.reconstruction = reconstruction
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def decode_sample(self, moments, noise, training=False):
        """Decode the posterior sample that `noise` selects (the deterministic path)."""
        latents = sample_posterior(moments, noise)
        return self.decoder(ops.cast(latents, self.decoder.compute_dtype), training=training)

    def call(self, inputs, training=False):
        moments = self.encoder(_images(inputs), training=training)  # [B, h, w, 2C]
        noise = keras.random.normal(
            ops.shape(moments)[:-1] + (self.encoder.latent_channels,),
            seed=self.seed_generator,
        )
        return {
            "reconstruction": self.decode_sample(moments, noise, training),
            "moments": moments,
        }

    def vae_loss(self, images, reconstruction, moments):
        """Reconstruction + kl_weight * KL, a float32 scalar (see the module docstring)."""
        error = ops.cast(reconstruction, "float32") - ops.cast(images, "float32")
        if self.reconstruction == "mse":
            rec = ops.mean(ops.square(error))
        else:
            rec = ops.mean(ops.abs(error))
        return rec + self.kl_weight * ops.mean(kl_divergence(moments))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = self.vae_loss(_images(x), y_pred["reconstruction"], y_pred["moments"])
        if self.losses:
            loss = loss + ops.sum(self.losses)
        return loss

    def get_config(self):
        return {
            "name": self.name,
            "encoder": serialize_component(self.encoder),
            "decoder": serialize_component(self.decoder),
            "kl_weight": self.kl_weight,
            "reconstruction": self.reconstruction,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "decoder"):
            config[key] = deserialize_component(config[key])
        return cls(**config)
