"""What keras-sd's trainers share: a `keras.Model` whose optimizer is built at `compile`,
and which trains float32 variables only."""

from __future__ import annotations

import keras

_LOW_PRECISION = ("float16", "bfloat16")


class Trainer(keras.Model):
    """A `keras.Model` that checks and prepares what it trains when compiled.

    Trained variables must be float32 masters: a model loaded for inference under a
    mixed policy holds float16/bfloat16 variables (see `keras_sd.weights.precision`),
    and updates in those would be rounded away; `compile` refuses them, naming the
    load that keeps float32 variables (`dtype="mixed_bfloat16"`). Layers that compute
    in float16 get loss scaling (Keras only adds it under the global "mixed_float16"
    policy), so their small gradients do not underflow.

    Keras otherwise creates the optimizer's variables (Adam: two per trained weight)
    inside the first traced train step. On TensorFlow that builds them in graph mode and
    makes the step trace twice, because variables were created on its first trace.
    Nothing changes when a wrapped model is not built yet: Keras then builds the
    optimizer on first use, as usual.

    Example:
    >>> from keras_sd.models.vae import VAEDecoder, VAEEncoder, TINY_CONFIG
    >>> from keras_sd.training import VAETrainer
    >>> trainer = VAETrainer(VAEEncoder(**TINY_CONFIG), VAEDecoder(**TINY_CONFIG))
    >>> trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> trainer.optimizer.built
    True
    """

    def compile(self, *args, **kwargs):
        low = [v.path for v in self.trainable_variables if v.dtype in _LOW_PRECISION]
        if low:
            raise ValueError(
                f"{len(low)} trainable variables are float16/bfloat16 (e.g. {low[0]}); "
                "training needs float32 variables. A model loaded under a mixed policy "
                "keeps its weights in the compute dtype for inference: load it with "
                'dtype="mixed_bfloat16" (or "mixed_float16") to train it.'
            )
        super().compile(*args, **kwargs)
        optimizer = self.optimizer
        if self._needs_loss_scaling(kwargs.get("auto_scale_loss", True)):
            optimizer = self.optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        parts = self._flatten_layers(include_self=False, recursive=False)
        if optimizer is not None and not optimizer.built and all(p.built for p in parts):
            optimizer.build(self.trainable_variables)

    def _needs_loss_scaling(self, auto_scale_loss: bool) -> bool:
        optimizer = self.optimizer
        if not auto_scale_loss or optimizer is None:
            return False
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return False
        return any(layer.compute_dtype == "float16" for layer in self._flatten_layers())
