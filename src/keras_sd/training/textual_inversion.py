"""`TextualInversionTrainer`: learn a new token's embedding with `fit()`, all else frozen.

Textual inversion (Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image
Generation using Textual Inversion", https://arxiv.org/abs/2208.01618): a placeholder token
is added to the vocabulary and only its embedding row(s) are optimised with the ordinary
diffusion loss, on a few images captioned from templates ("a photo of a {}").

Only the new rows get gradients: they live in one trainable variable of the trainer, and the
text encoder reads them in place of the table's rows for the new ids, while the table, the
rest of the text encoder, the UNet and the VAE are non-trainable. The loss and the training
step are `DiffusionTrainer`'s; `fit()` writes the learned rows back into the text encoder's
table when it returns, so the pipeline uses them at once.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_sd.training.diffusion import DiffusionTrainer
from keras_sd.training.textual_inversion_data import DEFAULT_TEMPLATES, textual_inversion_dataset


class NewTokenRows(keras.layers.Layer):
    """A frozen `CLIPTextEncoder` whose new token rows come from a trainable variable.

    Args:
        text_encoder: the `CLIPTextEncoder` (made non-trainable).
        token_ids: the ids of the new rows, in row order.
        **kwargs: base layer arguments.

    Returns (call):
        `call(token_ids [B, L])` -> context [B, L, D], equal to `text_encoder(token_ids)`
        when `rows` equals the table's rows for `token_ids`.

    Example:
    >>> encoder = CLIPTextEncoder(**TINY_CONFIG)  # doctest: +SKIP
    >>> rows = NewTokenRows(encoder, [49407])  # doctest: +SKIP
    """

    def __init__(self, text_encoder, token_ids, **kwargs):
        super().__init__(**kwargs)
        self.text_encoder = text_encoder
        self.new_ids = np.asarray(token_ids, np.int32)
        table = text_encoder.token_embedding.embeddings
        start = ops.convert_to_numpy(ops.cast(ops.take(table, self.new_ids, axis=0), "float32"))
        self.rows = self.add_weight(
            shape=start.shape,
            initializer="zeros",
            dtype="float32",
            name="new_token_rows",
        )
        self.rows.assign(start)
        self.built = True

    def call(self, token_ids, training=False):
        encoder = self.text_encoder
        token_ids = ops.cast(token_ids, "int32")
        frozen = ops.stop_gradient(encoder.token_embedding(token_ids))  # [B, L, D]
        new_ids = ops.convert_to_tensor(self.new_ids, "int32")
        match = ops.cast(ops.equal(token_ids[..., None], new_ids), "float32")  # [B, L, N]
        learned = ops.einsum("bln,nd->bld", match, ops.cast(self.rows, "float32"))
        keep = 1.0 - ops.sum(match, axis=-1, keepdims=True)
        embeddings = ops.cast(frozen, "float32") * keep + learned
        embeddings = ops.cast(embeddings, encoder.compute_dtype)
        return encoder(token_ids, token_embeddings=embeddings, training=training)


class TextualInversionTrainer(DiffusionTrainer):
    """Trains only a new token's embedding rows of a `StableDiffusion`, with `fit()`.

    The token is added to `sd` (tokenizer and text-encoder table) unless it is already an
    added token, in which case training continues from its current rows. Gradients reach
    a separate trainable variable holding just the new rows (see the module docstring);
    every other weight of `sd` is made non-trainable and stays bit-identical. Works with
    `fit()` on TensorFlow, JAX and PyTorch, with `jit_compile`, and under the
    `mixed_float16` (Keras wraps the optimizer in loss scaling) and `mixed_bfloat16`
    policies; the rows stay float32, also on a model loaded with float16/bfloat16 weights
    (see `keras_sd.weights.precision`; float16 compute gets loss scaling).

    Args:
        sd: a `StableDiffusion`.
        token: the placeholder, e.g. "<cat-toy>" (one word, no whitespace).
        initializer_token: a one-token word the rows start from, e.g. "toy"; None: a
            seeded random draw (see `StableDiffusion.add_tokens`).
        num_vectors: rows of the concept (`token` then stands for `token`, `token_1`, ...).
        seed: seed of the noise and timestep draws (and of a random start).
        snr_gamma: Min-SNR-gamma loss weighting, as in `DiffusionTrainer`.
        **kwargs: base `keras.Model` arguments.

    Example:
    >>> import keras_sd
    >>> sd = keras_sd.StableDiffusion.from_preset("tiny-shapes")
    >>> trainer = TextualInversionTrainer(sd, "<s1>", initializer_token="circle", seed=0)
    >>> trainer.compile(optimizer=keras.optimizers.Adam(5e-3))
    >>> data = textual_inversion_dataset(images, "<s1>", sd.tokenizer, size=64)  # doctest: +SKIP
    >>> trainer.fit(data, epochs=1)  # doctest: +SKIP
    >>> trainer.save_embedding("learned_embeds.safetensors")  # doctest: +SKIP
    """

    def __init__(
        self,
        sd,
        token: str,
        initializer_token: str | None = None,
        num_vectors: int = 1,
        seed: int | None = None,
        snr_gamma: float | None = None,
        **kwargs,
    ):
        if token not in sd.tokenizer.added_tokens:
            sd.add_tokens(token, initializer_token, num_vectors=num_vectors, seed=seed)
        ids = sd.tokenizer.encode(token)[1:-1]
        super().__init__(
            NewTokenRows(sd.text_encoder, ids, name="new_token_rows"),
            sd.diffusion_model,
            sd.image_encoder,
            sd.scheduler,
            train_text_encoder=True,
            condition_dropout=0.0,
            seed=seed,
            snr_gamma=snr_gamma,
            **kwargs,
        )
        # After the base class made the wrapper (and so its children) trainable.
        sd.text_encoder.trainable = False
        sd.diffusion_model.trainable = False
        self.sd = sd
        self.token = token

    @property
    def embedding(self) -> np.ndarray:
        """The learned rows [N, D] (float32)."""
        return np.asarray(ops.convert_to_numpy(self.text_encoder.rows))

    def apply_embedding(self) -> None:
        """Write the learned rows into the text encoder's table (`fit` does it on return)."""
        self.sd.set_token_vectors(self.token, self.embedding)

    def fit(self, *args, **kwargs):
        try:
            return super().fit(*args, **kwargs)
        finally:
            self.apply_embedding()

    def save_embedding(self, path, layout: str = "diffusers") -> None:
        """Write the learned rows as a `.safetensors` embedding file (see
        `StableDiffusion.save_textual_inversion`)."""
        self.apply_embedding()
        self.sd.save_textual_inversion(path, self.token, layout=layout)

    def get_config(self):
        raise NotImplementedError(
            "TextualInversionTrainer is not serialised; save the learned token with "
            "save_embedding() and the model with StableDiffusion.save_checkpoint()."
        )


__all__ = [
    "DEFAULT_TEMPLATES",
    "NewTokenRows",
    "TextualInversionTrainer",
    "textual_inversion_dataset",
]
