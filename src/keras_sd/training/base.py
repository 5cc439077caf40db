"""What keras-sd's trainers share: a `keras.Model` whose optimizer is built at `compile`."""

from __future__ import annotations

import keras


class Trainer(keras.Model):
    """A `keras.Model` that creates its optimizer's variables when compiled.

    Keras otherwise creates them (Adam: two per trained weight) inside the first traced
    train step. On TensorFlow that builds them in graph mode and makes the step trace
    twice, because variables were created on its first trace. Nothing changes when a
    wrapped model is not built yet: Keras then builds the optimizer on first use, as usual.

    Example:
    >>> from keras_sd.models.vae import VAEDecoder, VAEEncoder, TINY_CONFIG
    >>> from keras_sd.training import VAETrainer
    >>> trainer = VAETrainer(VAEEncoder(**TINY_CONFIG), VAEDecoder(**TINY_CONFIG))
    >>> trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> trainer.optimizer.built
    True
    """

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        parts = self._flatten_layers(include_self=False, recursive=False)
        optimizer = self.optimizer
        if optimizer is not None and not optimizer.built and all(p.built for p in parts):
            optimizer.build(self.trainable_variables)
