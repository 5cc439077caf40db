"""The keras.io KerasCV Stable Diffusion guides' calls, through `keras_sd.compat.keras_cv`.

Each test runs the calls and attribute accesses of one guide twice: on KerasCV 0.9
itself (`keras_cv_sd1`, conftest.py) and on the drop-in converted from it
(`keras_cv_drop_in`, the same weights), and compares the values. The guides' sizes and
step counts are made small (64 px, a few steps), their random draws are seeded so both
runs draw the same, and their downloads are replaced by the shared models; the calls
are the guides' own. Guides: "High-performance image generation using Stable Diffusion
in KerasCV", "A walk through latent space with Stable Diffusion" and "Fine-tuning Stable
Diffusion" here; "Teach StableDiffusion new concepts via Textual Inversion" in
test_keras_cv_textual_inversion.py.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops
from test_keras_cv_parity import assert_not_flat, grey_levels

from conftest import FULL_SIZE, KERAS_CV_SIZE, release_memory

pytest.importorskip("keras_cv")
import keras_cv  # noqa: E402

from keras_sd.compat import keras_cv as drop_in  # noqa: E402

pytestmark = [pytest.mark.xdist_group(FULL_SIZE), pytest.mark.slow]
LATENT = KERAS_CV_SIZE // 8


def test_generate_images_guide(keras_cv_sd1, keras_cv_drop_in):
    prompt = "photograph of an astronaut riding a horse"
    # The guide's text_to_image(prompt, batch_size=3), seeded: both draw keras.random.normal.
    expected = keras_cv_sd1.text_to_image(prompt, batch_size=2, num_steps=3, seed=7)
    actual = keras_cv_drop_in.text_to_image(prompt, batch_size=2, num_steps=3, seed=7)
    assert_not_flat(expected)
    assert grey_levels(actual, expected) <= 1
    for name in ("compute_dtype", "variable_dtype"):
        ours = getattr(keras_cv_drop_in.diffusion_model, name)
        assert ours == getattr(keras_cv_sd1.diffusion_model, name) == "float32"


def test_generate_images_guide_mixed_precision():
    """The guide's mixed-precision part, on a tiny config (KerasCV's own full-size
    mixed-precision model would be a second full-size build): float16 compute, float32
    variables, as KerasCV reports them, and images that are not NaN garbage."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = drop_in.models.StableDiffusion(128, 128, jit_compile=False, config="tiny")
        assert model.diffusion_model.compute_dtype == "float16"
        assert model.diffusion_model.variable_dtype == "float32"
        images = model.text_to_image("warming up the model", batch_size=3, num_steps=2, seed=1)
        assert images.shape == (3, 128, 128, 3) and images.dtype == np.uint8
        assert images.std() > 0
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _walk(model, noise_seed=12345):
    """The walk guide's calls on `model`: prompt interpolation with one noise, a walk
    around a prompt, and a circular walk through the noise (float64, as the guide)."""
    encoding_1 = ops.squeeze(model.encode_text("A watercolor painting of a Golden Retriever"))
    encoding_2 = ops.squeeze(model.encode_text("A still life DSLR photo of a bowl of fruit"))
    interpolated = ops.linspace(encoding_1, encoding_2, 3)
    noise = keras.random.normal((LATENT, LATENT, 4), seed=noise_seed)
    images = [model.generate_image(interpolated, batch_size=3, num_steps=3, diffusion_noise=noise)]

    encoding = ops.squeeze(model.encode_text("The Eiffel Tower in the style of starry night"))
    delta = ops.ones_like(encoding) * 0.005
    walked = []
    for _ in range(2):
        walked.append(encoding)
        encoding += delta
    batched = ops.split(ops.stack(walked), 1)
    images.append(
        model.generate_image(batched[0], batch_size=2, num_steps=3, diffusion_noise=noise)
    )

    walk_noise_x = keras.random.normal(noise.shape, dtype="float64", seed=1)
    walk_noise_y = keras.random.normal(noise.shape, dtype="float64", seed=2)
    walk_scale_x = ops.cos(ops.linspace(0, 2, 2) * math.pi)
    walk_scale_y = ops.sin(ops.linspace(0, 2, 2) * math.pi)
    noise_x = ops.tensordot(walk_scale_x, walk_noise_x, axes=0)
    noise_y = ops.tensordot(walk_scale_y, walk_noise_y, axes=0)
    batched_noise = ops.split(ops.add(noise_x, noise_y), 1)
    images.append(
        model.generate_image(
            encoding_1, batch_size=2, num_steps=3, diffusion_noise=batched_noise[0]
        )
    )
    return images


def test_latent_walk_guide(keras_cv_sd1, keras_cv_drop_in):
    expected = _walk(keras_cv_sd1)
    actual = _walk(keras_cv_drop_in)
    for ours, theirs in zip(actual, expected, strict=True):
        assert_not_flat(theirs)
        assert grey_levels(ours, theirs) <= 1
    assert grey_levels(expected[0][0], expected[0][2]) > 5  # the interpolation moved


class FineTuner(keras.Model):
    """The fine-tuning guide's `Trainer`, with its noise and timesteps drawn from fixed
    seeds (stateless) so that KerasCV's run and the drop-in's draw the same."""

    def __init__(self, diffusion_model, vae, noise_scheduler, max_grad_norm=1.0, **kwargs):
        super().__init__(**kwargs)
        self.diffusion_model = diffusion_model
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.max_grad_norm = max_grad_norm
        self.vae.trainable = False

    def train_step(self, inputs):
        import tensorflow as tf

        images = inputs["images"]
        encoded_text = inputs["encoded_text"]
        bsz = tf.shape(images)[0]
        with tf.GradientTape() as tape:
            latents = self.vae(images, training=False)
            latents = latents * 0.18215
            noise = tf.random.stateless_normal(tf.shape(latents), seed=[1, 2])
            timesteps = tf.random.stateless_uniform(
                (bsz,), [3, 4], 0, self.noise_scheduler.train_timesteps, dtype=tf.int64
            )
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise
            timestep_embedding = tf.map_fn(
                lambda t: self.get_timestep_embedding(t), timesteps, dtype=tf.float32
            )
            timestep_embedding = tf.squeeze(timestep_embedding, 1)
            model_pred = self.diffusion_model(
                [noisy_latents, timestep_embedding, encoded_text], training=True
            )
            loss = self.compiled_loss(target, model_pred)
        trainable_vars = self.diffusion_model.trainable_variables
        gradients = tape.gradient(loss, trainable_vars)
        gradients = [tf.clip_by_norm(g, self.max_grad_norm) for g in gradients]
        self.optimizer.apply_gradients(zip(gradients, trainable_vars, strict=True))
        return {m.name: m.result() for m in self.metrics}

    def get_timestep_embedding(self, timestep, dim=320, max_period=10000):
        import tensorflow as tf

        half = dim // 2
        log_max_period = tf.math.log(tf.cast(max_period, tf.float32))
        freqs = tf.math.exp(-log_max_period * tf.range(0, half, dtype=tf.float32) / half)
        args = tf.convert_to_tensor([timestep], dtype=tf.float32) * freqs
        embedding = tf.concat([tf.math.cos(args), tf.math.sin(args)], 0)
        return tf.reshape(embedding, [1, -1])


def _fine_tune(namespace, tokenizer, text_encoder, diffusion_model, layers, vae, images):
    """The fine-tuning guide's data preparation and one training step; returns the
    tokens, their decoding, the text encodings, the step's loss and the trained
    output convolution's new weights."""
    import tensorflow as tf

    max_length = 77
    padding_token = 49407
    captions = ["a drawing of a green pokemon with red eyes", "a blue cartoon dragon"]
    tokenized = np.empty((len(captions), max_length))
    for i, caption in enumerate(captions):
        tokens = tokenizer.encode(caption)
        tokenized[i] = np.array(tokens + [padding_token] * (max_length - len(tokens)))
    decoded = tokenizer.decode(tokenized[0].astype(int).tolist())
    pos_ids = tf.convert_to_tensor([list(range(max_length))], dtype=tf.int32)
    encoded = text_encoder([tf.convert_to_tensor(tokenized), pos_ids], training=False)
    dataset = tf.data.Dataset.from_tensor_slices({"images": images, "encoded_text": encoded})
    # The guide trains every UNet weight; here only the output convolution, so that the
    # gradients and AdamW's slots stay small beside the two full-size models.
    output_conv = layers[-1]  # last: the output convolution
    for layer in layers:
        layer.trainable = layer is output_conv
    before = [np.array(w) for w in output_conv.get_weights()]
    trainer = FineTuner(diffusion_model, vae, namespace.models.stable_diffusion.NoiseScheduler())
    optimizer = keras.optimizers.AdamW(
        learning_rate=1e-5, weight_decay=1e-2, beta_1=0.9, beta_2=0.999, epsilon=1e-08
    )
    try:
        trainer.compile(optimizer=optimizer, loss="mse", jit_compile=False)
        history = trainer.fit(dataset.batch(2), epochs=1, verbose=0)
        after = [np.array(w) for w in output_conv.get_weights()]
    finally:  # the shared models as they were
        output_conv.set_weights(before)
        for layer in [*layers, vae]:
            layer.trainable = True
    changes = [a - b for a, b in zip(after, before, strict=True)]
    return tokenized, decoded, np.asarray(encoded), history.history["loss"][0], changes


def test_fine_tuning_guide(keras_cv_sd1, keras_cv_drop_in, tmp_path):
    images = np.random.default_rng(3).uniform(-1, 1, (2, KERAS_CV_SIZE, KERAS_CV_SIZE, 3))
    images = images.astype("float32")
    expected = _fine_tune(
        keras_cv,
        keras_cv_sd1.tokenizer,
        keras_cv_sd1.text_encoder,
        keras_cv_sd1.diffusion_model,
        keras_cv_sd1.diffusion_model.layers,
        keras_cv_sd1.image_encoder,
        images,
    )
    release_memory()  # KerasCV's trainer and its traced step, before the drop-in's
    stable_diffusion = drop_in.models.stable_diffusion
    # The guide's `TextEncoder(MAX_PROMPT_LENGTH)` downloads KerasCV's weights; the
    # drop-in's loads KerasCV's weights file with `load_weights`, as the guide does with
    # its fine-tuned diffusion model's.
    path = str(tmp_path / "text_encoder.weights.h5")
    keras_cv_sd1.text_encoder.save_weights(path)
    text_encoder = stable_diffusion.text_encoder.TextEncoder(stable_diffusion.MAX_PROMPT_LENGTH)
    text_encoder.load_weights(path)
    ours = keras_cv_drop_in.diffusion_model
    unet = ours.unet
    actual = _fine_tune(
        drop_in,
        stable_diffusion.clip_tokenizer.SimpleTokenizer(),
        text_encoder,
        ours,
        [*(layer for layer in unet.layers if layer is not unet.conv_out), unet.conv_out],
        keras_cv_drop_in.image_encoder,
        images,
    )
    np.testing.assert_array_equal(actual[0], expected[0])
    assert actual[1] == expected[1] and "pokemon" in actual[1]
    np.testing.assert_allclose(actual[2], expected[2], atol=1e-4)
    np.testing.assert_allclose(actual[3], expected[3], rtol=1e-4)
    assert np.abs(expected[4][0]).max() > 5e-6  # AdamW moved the kernel by about 1e-5
    for ours_change, theirs in zip(actual[4], expected[4], strict=True):
        np.testing.assert_allclose(ours_change, theirs, atol=1e-6)
