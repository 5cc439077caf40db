"""The drop-in on a tiny config: what KerasCV has no counterpart to compare with (keras-sd's
image workflows on KerasCV-form components) and the textual-inversion guide's encoder
surgery, checked against keras-sd's own models."""

import numpy as np
import pytest
from keras import ops

from keras_sd import StableDiffusion
from keras_sd.compat import keras_cv


@pytest.fixture(scope="module")
def tiny():
    return keras_cv.models.StableDiffusion(
        img_height=128, img_width=128, config="tiny", jit_compile=False
    )


def test_image_workflows_use_the_keras_cv_form_components(tiny):
    """The drop-in's image encoder returns KerasCV's scaled mean and its UNet wrapper
    takes KerasCV's call form; keras-sd's image-to-image and inpainting still work on
    them and give the native pipeline's images (which round where KerasCV truncates)."""
    native = StableDiffusion(
        128,
        128,
        config="tiny",
        jit_compile=False,
        tokenizer=tiny.tokenizer,
        text_encoder=tiny.text_encoder.encoder,
        diffusion_model=tiny.diffusion_model.unet,
        decoder=tiny.decoder.decoder,
        image_encoder=tiny.image_encoder.layers[-2],
        scheduler="keras_cv",
    )
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    np.testing.assert_allclose(tiny.encode_image(image), native.encode_image(image), atol=1e-6)
    kwargs = dict(num_steps=2, seed=0, progress=False)
    ours = tiny.image_to_image("a red circle", image, **kwargs)
    theirs = native.image_to_image("a red circle", image, **kwargs)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    mask = np.zeros((128, 128), np.uint8)
    mask[:64] = 255
    ours = tiny.inpaint("a red circle", image, mask, **kwargs)
    theirs = native.inpaint("a red circle", image, mask, **kwargs)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_text_encoder_grown_through_keras_cv_layers(tiny):
    """The guide's surgery: a new `TextEncoder(..., vocab_size=n + 1)`, every layer but
    the embeddings copied by index, the embeddings through `layers[2]`."""
    old = tiny.text_encoder
    layers = old.layers
    assert layers[2].name == "clip_embedding"
    assert len(layers) == 2 + 1 + old.encoder.num_layers + 1
    new = keras_cv.models.stable_diffusion.TextEncoder(
        77, vocab_size=old.vocab_size + 1, download_weights=False, config="tiny"
    )
    for index, layer in enumerate(layers):
        if index != 2:
            new.layers[index].set_weights(layer.get_weights())
    table = layers[2].token_embedding.get_weights()[0]
    row = ops.convert_to_numpy(layers[2].token_embedding(ops.convert_to_tensor(320)))
    new.layers[2].token_embedding.set_weights([np.concatenate([table, row[None]], 0)])
    new.layers[2].position_embedding.set_weights(layers[2].position_embedding.get_weights())

    tokens = np.array([[49406, 320, 1125, 49407] + [49407] * 73])
    positions = np.arange(77)[None]
    expected = np.asarray(old([tokens, positions]))
    np.testing.assert_allclose(np.asarray(new([tokens, positions])), expected, atol=1e-6)
    grown = tokens.copy()
    grown[0, 1] = old.vocab_size  # the new token, initialised from token 320
    np.testing.assert_allclose(np.asarray(new([grown, positions])), expected, atol=1e-6)

    new.trainable = True
    for layer in new.layers:
        layer.trainable = layer.name == "clip_embedding"
    new.layers[2].position_embedding.trainable = False
    assert [tuple(w.shape) for w in new.trainable_weights] == [(old.vocab_size + 1, 32)]
    with pytest.raises(ValueError, match="download"):
        keras_cv.models.stable_diffusion.TextEncoder(77, download_weights=True)
