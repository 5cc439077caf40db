"""Training with the built-in `fit()` of any Keras backend."""

from keras_sd.training.diffusion import DiffusionTrainer
from keras_sd.training.textual_inversion import (
    DEFAULT_TEMPLATES,
    TextualInversionTrainer,
    textual_inversion_dataset,
)
from keras_sd.training.vae import VAETrainer, kl_divergence, sample_posterior

__all__ = [
    "DEFAULT_TEMPLATES",
    "DiffusionTrainer",
    "TextualInversionTrainer",
    "VAETrainer",
    "kl_divergence",
    "sample_posterior",
    "textual_inversion_dataset",
]
