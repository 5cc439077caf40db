"""The keras.io guide "Teach StableDiffusion new concepts via Textual Inversion", through
`keras_sd.compat.keras_cv`, against KerasCV on the same weights.

`_teach` makes the guide's calls on a model and the `keras_cv` namespace it came from:
adding the placeholder token, padding prompts with `tokenizer.end_of_text`, growing the
text encoder through `text_encoder.layers[2]` and `TextEncoder(..., vocab_size=...)`,
freezing all but the token embedding, the image encoder's `layers[-2]`, and a fit of the
guide's `StableDiffusionFineTuner` (its `train_step` with `NoiseScheduler.add_noise`,
`text_encoder([tokens, positions])` and `diffusion_model([latents, t_emb, context])`).
The guide's random draws are seeded (stateless) so both runs draw the same; its sizes
are small (64 px images, 2 sampling steps).
"""

import math

import keras
import numpy as np
import pytest
from test_keras_cv_parity import grey_levels

from conftest import FULL_SIZE, KERAS_CV_SIZE, bundled_vocab_path, release_memory

pytest.importorskip("keras_cv")
import keras_cv  # noqa: E402
from keras_cv.src.models.stable_diffusion.clip_tokenizer import (  # noqa: E402
    SimpleTokenizer as KerasCVTokenizer,
)

from keras_sd.compat import keras_cv as drop_in  # noqa: E402

pytestmark = [pytest.mark.xdist_group(FULL_SIZE), pytest.mark.slow]
PLACEHOLDER = "<my-funny-cat-token>"
MAX_PROMPT_LENGTH = 77


def get_timestep_embedding(timestep, dim=320, max_period=10000):
    import tensorflow as tf

    half = dim // 2
    freqs = tf.math.exp(-math.log(max_period) * tf.range(0, half, dtype=tf.float32) / half)
    args = tf.convert_to_tensor([timestep], dtype=tf.float32) * freqs
    return tf.concat([tf.math.cos(args), tf.math.sin(args)], 0)


def get_position_ids():
    import tensorflow as tf

    return tf.convert_to_tensor([list(range(MAX_PROMPT_LENGTH))], dtype=tf.int32)


def sample_from_encoder_outputs(outputs):
    import tensorflow as tf

    mean, logvar = tf.split(outputs, 2, axis=-1)
    logvar = tf.clip_by_value(logvar, -30.0, 20.0)
    std = tf.exp(0.5 * logvar)
    return mean + std * tf.random.stateless_normal(tf.shape(mean), seed=[5, 6])


class StableDiffusionFineTuner(keras.Model):
    """The guide's fine-tuner (its random draws seeded)."""

    def __init__(self, stable_diffusion, noise_scheduler, image_encoder, **kwargs):
        super().__init__(**kwargs)
        self.stable_diffusion = stable_diffusion
        self.noise_scheduler = noise_scheduler
        self.training_image_encoder = image_encoder

    def train_step(self, data):
        import tensorflow as tf

        images, embeddings = data
        with tf.GradientTape() as tape:
            latents = sample_from_encoder_outputs(self.training_image_encoder(images))
            latents = latents * 0.18215
            noise = tf.random.stateless_normal(tf.shape(latents), seed=[1, 2])
            batch_dim = tf.shape(latents)[0]
            timesteps = tf.random.stateless_uniform(
                (batch_dim,), [3, 4], 0, self.noise_scheduler.train_timesteps, dtype=tf.int64
            )
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_state = self.stable_diffusion.text_encoder(
                [embeddings, get_position_ids()]
            )
            timestep_embeddings = tf.map_fn(
                fn=get_timestep_embedding, elems=timesteps, fn_output_signature=tf.float32
            )
            noise_pred = self.stable_diffusion.diffusion_model(
                [noisy_latents, timestep_embeddings, encoder_hidden_state]
            )
            loss = self.compiled_loss(noise_pred, noise)
            loss = tf.reduce_mean(loss, axis=2)
            loss = tf.reduce_mean(loss, axis=1)
            loss = tf.reduce_mean(loss)
        trainable_weights = self.stable_diffusion.text_encoder.trainable_weights
        grads = tape.gradient(loss, trainable_weights)
        condition = grads[0].indices == 49408
        condition = tf.expand_dims(condition, axis=-1)
        grads[0] = tf.IndexedSlices(
            values=tf.where(condition, grads[0].values, 0),
            indices=grads[0].indices,
            dense_shape=grads[0].dense_shape,
        )
        self.optimizer.apply_gradients(zip(grads, trainable_weights, strict=True))
        return {"loss": loss}


def traverse_layers(layer):
    if hasattr(layer, "layers"):
        yield from layer.layers
    if hasattr(layer, "token_embedding"):
        yield layer.token_embedding
    if hasattr(layer, "position_embedding"):
        yield layer.position_embedding


def _teach(stable_diffusion, namespace, images):
    """The guide's calls on `stable_diffusion` (KerasCV's or the drop-in); returns what
    each step produced."""
    import tensorflow as tf

    out = {}
    tokenizer = stable_diffusion.tokenizer
    out["added"] = tokenizer.add_tokens(PLACEHOLDER)

    def pad_embedding(embedding):
        return embedding + [tokenizer.end_of_text] * (MAX_PROMPT_LENGTH - len(embedding))

    prompts = [p.format(PLACEHOLDER) for p in ("a photo of a {}", "a rendering of a {}")]
    embeddings = [np.array(pad_embedding(tokenizer.encode(p))) for p in prompts]
    out["tokens"] = np.stack(embeddings)
    text_dataset = tf.data.Dataset.from_tensor_slices(embeddings)
    train_ds = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices(images), text_dataset))
    train_ds = train_ds.batch(1)

    tokenized_initializer = tokenizer.encode("cat")[1]
    text_encoder = stable_diffusion.text_encoder
    new_weights = text_encoder.layers[2].token_embedding(tf.constant(tokenized_initializer))
    new_vocab_size = len(tokenizer.vocab)
    old_token_weights = text_encoder.layers[2].token_embedding.get_weights()[0]
    old_position_weights = text_encoder.layers[2].position_embedding.get_weights()
    new_weights = np.concatenate([old_token_weights, np.expand_dims(new_weights, axis=0)], 0)
    new_encoder = namespace.models.stable_diffusion.TextEncoder(
        MAX_PROMPT_LENGTH, vocab_size=new_vocab_size, download_weights=False
    )
    for index, layer in enumerate(text_encoder.layers):
        if index == 2:
            continue
        new_encoder.layers[index].set_weights(layer.get_weights())
    new_encoder.layers[2].token_embedding.set_weights([new_weights])
    new_encoder.layers[2].position_embedding.set_weights(old_position_weights)
    stable_diffusion._text_encoder = new_encoder
    stable_diffusion._text_encoder.compile(jit_compile=True)
    out["before"] = stable_diffusion.text_to_image(
        f"an oil painting of {PLACEHOLDER}", seed=1337, batch_size=2, num_steps=2
    )

    stable_diffusion.diffusion_model.trainable = False
    stable_diffusion.decoder.trainable = False
    stable_diffusion.text_encoder.trainable = True
    stable_diffusion.text_encoder.layers[2].trainable = True
    for layer in traverse_layers(stable_diffusion.text_encoder):
        layer.trainable = isinstance(layer, keras.layers.Embedding) or (
            "clip_embedding" in layer.name
        )
    new_encoder.layers[2].position_embedding.trainable = False
    all_models = [
        stable_diffusion.text_encoder,
        stable_diffusion.diffusion_model,
        stable_diffusion.decoder,
    ]
    out["trainable"] = [[tuple(w.shape) for w in m.trainable_weights] for m in all_models]

    image_encoder = stable_diffusion.image_encoder
    training_image_encoder = keras.Model(
        _model_input(image_encoder), image_encoder.layers[-2].output
    )
    noise_scheduler = namespace.models.stable_diffusion.NoiseScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", train_timesteps=1000
    )
    trainer = StableDiffusionFineTuner(
        stable_diffusion, noise_scheduler, training_image_encoder, name="trainer"
    )
    learning_rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=1e-4, decay_steps=train_ds.cardinality() * 1
    )
    optimizer = keras.optimizers.Adam(
        weight_decay=0.004, learning_rate=learning_rate, epsilon=1e-8, global_clipnorm=10
    )
    trainer.compile(
        optimizer=optimizer, loss=keras.losses.MeanSquaredError(reduction="none"), jit_compile=False
    )
    out["loss"] = trainer.fit(train_ds, epochs=1, verbose=0).history["loss"]
    table = np.asarray(new_encoder.layers[2].token_embedding.get_weights()[0])
    out["learned"] = table[-1] - new_weights[-1]
    out["others"] = np.abs(table[:-1] - new_weights[:-1]).max()
    return out


def _model_input(model):
    """`model.input`. KerasCV 0.9's image encoder is a `Sequential` whose `input` fails
    on Keras 3 ("never been called"): the guide's line needs its functional graph's."""
    try:
        return model.input
    except AttributeError:
        return model._functional.input


def _restore(stable_diffusion, text_encoder, tokenizer):
    stable_diffusion._text_encoder = text_encoder
    stable_diffusion._tokenizer = tokenizer
    for model in (stable_diffusion.diffusion_model, stable_diffusion.decoder):
        model.trainable = True


def test_textual_inversion_guide(keras_cv_sd1, keras_cv_drop_in):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the guide's train_step is TensorFlow code (GradientTape, IndexedSlices)")
    images = np.random.default_rng(4).uniform(-1, 1, (2, KERAS_CV_SIZE, KERAS_CV_SIZE, 3))
    images = images.astype("float32")
    runs = {}
    for name, sd, namespace, fresh_tokenizer in (
        (
            "kcv",
            keras_cv_sd1,
            keras_cv,
            lambda: KerasCVTokenizer(bpe_path=bundled_vocab_path()),
        ),
        ("ours", keras_cv_drop_in, drop_in, drop_in.models.stable_diffusion.SimpleTokenizer),
    ):
        originals = (sd._text_encoder, sd._tokenizer)
        sd._tokenizer = fresh_tokenizer()  # the guide adds a token to it
        try:
            runs[name] = _teach(sd, namespace, images)
        finally:
            _restore(sd, *originals)
        release_memory()  # the run's grown text encoder, trainer and compiled programs
    kcv, ours = runs["kcv"], runs["ours"]
    assert ours["added"] == kcv["added"] == 1
    np.testing.assert_array_equal(ours["tokens"], kcv["tokens"])
    assert ours["trainable"] == kcv["trainable"] == [[(49409, 768)], [], []]
    assert grey_levels(ours["before"], kcv["before"]) <= 1
    np.testing.assert_allclose(ours["loss"], kcv["loss"], rtol=1e-4)
    # Only the new token's row learned; Adam's weight decay shrank the others a little.
    assert ours["others"] < 1e-6 and kcv["others"] < 1e-6
    # Adam's first step moves each element by about the learning rate (1e-4).
    assert np.abs(kcv["learned"]).max() > 5e-5
    np.testing.assert_allclose(ours["learned"], kcv["learned"], atol=2e-6)
