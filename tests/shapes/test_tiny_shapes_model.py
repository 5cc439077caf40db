"""The bundled tiny-shapes model draws what it is asked (a broken model or pipeline fails)."""

from keras_sd import presets
from keras_sd.shapes import checker
from keras_sd.weights.bundle import load_bundle

PROMPT = "a red circle on a blue background"


def test_bundled_model_follows_a_prompt():
    sd = load_bundle(presets.bundled_preset_path("tiny-shapes"), jit_compile=False)
    assert (sd.img_width, sd.img_height) == (64, 64)
    images = sd.text_to_image(PROMPT, batch_size=4, num_steps=20, seed=0, progress=False)
    assert images.shape == (4, 64, 64, 3)
    results = [checker.check(image, PROMPT) for image in images]
    # Thresholds sit below what the shipped model does (docs/tiny-shapes.md) and far above
    # chance (1/6 per colour): random or mis-loaded weights, or a broken sampler, fail them.
    assert sum(r.background_ok for r in results) >= 3, results
    assert sum(r.color_ok for r in results) >= 2, results
