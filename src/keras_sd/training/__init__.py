"""Training with the built-in `fit()` of any Keras backend."""

from keras_sd.training.diffusion import DiffusionTrainer
from keras_sd.training.vae import VAETrainer, kl_divergence, sample_posterior

__all__ = ["DiffusionTrainer", "VAETrainer", "kl_divergence", "sample_posterior"]
