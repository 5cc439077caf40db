"""Building and loading `StableDiffusion`: subclasses, KerasCV's argument order,
components and schedulers read at call time."""

import keras
import numpy as np
import pytest

from backend_children import built_from_values, random_tiny_sd
from keras_sd import DDIMScheduler, StableDiffusion
from keras_sd.models.unet import UNet
from keras_sd.schedulers import scheduler_names
from keras_sd.weights.deferred import MODELS


class MySD(StableDiffusion):
    """A researcher's subclass with its own method."""

    def describe(self) -> str:
        return f"{type(self).__name__} {self.img_height}x{self.img_width}"


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_sd(32, 32, jit_compile=False)


@pytest.fixture
def eager_on_tensorflow():
    """TensorFlow runs its graphs as Python, for checks of what a call reads rather than
    of the program it compiles (tracing costs more than the tiny model's steps). Other
    backends run as usual; the shared JAX child runs the replacement checks compiled
    (tests/backend_children.py, CONSTRUCTION_TESTS)."""
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)


def test_subclass_loads_as_itself_from_preset_and_checkpoint(tmp_path):
    preset = MySD.from_preset("tiny-shapes", jit_compile=False)
    assert type(preset) is MySD and preset.describe() == "MySD 64x64"
    for layout, name in (("compvis", "m.safetensors"), ("keras", "k.safetensors")):
        preset.save_checkpoint(tmp_path / name, layout=layout)
        kwargs = {"config": "tiny"} if layout == "compvis" else {}
        loaded = MySD.from_checkpoint(tmp_path / name, jit_compile=False, **kwargs)
        assert type(loaded) is MySD, layout
    preset.save_checkpoint(tmp_path / "folder", layout="diffusers")
    assert type(MySD.from_checkpoint(tmp_path / "folder", jit_compile=False)) is MySD
    assert type(StableDiffusion.from_preset("tiny-shapes")) is StableDiffusion


def test_positional_size_is_keras_cv_order(eager_on_tensorflow):
    """KerasCV: StableDiffusion(img_height, img_width, jit_compile)."""
    for sd in (
        StableDiffusion(32, 48, False, config="tiny"),
        StableDiffusion(img_height=32, img_width=48, config="tiny", jit_compile=False),
    ):
        assert (sd.img_height, sd.img_width) == (32, 48)
        image = sd.text_to_image("a red circle", num_steps=1, seed=0, progress=False)
        assert image.shape == (1, 32, 48, 3)


def test_assigned_unet_is_used_on_the_next_call(tiny):
    kwargs = dict(num_steps=2, seed=4, progress=False)
    before = tiny.text_to_image("a red circle", **kwargs)
    original = tiny.diffusion_model
    # Different random weights, same architecture.
    other = built_from_values(
        lambda: {"unet": UNet(**tiny.config["unet"])},
        lambda v: np.random.default_rng(5).normal(0, 0.05, v.shape).astype(v.dtype),
    )["unet"]
    try:
        tiny.diffusion_model = other
        after = tiny.text_to_image("a red circle", **kwargs)
        assert tiny.sampler.unet is other
        assert np.abs(after.astype(int) - before.astype(int)).mean() > 1.0
    finally:
        tiny.diffusion_model = original
    np.testing.assert_array_equal(tiny.text_to_image("a red circle", **kwargs), before)


@pytest.mark.parametrize("component", ["text_encoder", "decoder"])
def test_assigned_encoder_or_decoder_is_used_on_the_next_call(tiny, component):
    kwargs = dict(num_steps=2, seed=4, progress=False)
    before = tiny.text_to_image("a red circle", **kwargs)
    original = getattr(tiny, component)
    # The replacement's weights are the original's moved apart.
    rng, weights = np.random.default_rng(5), iter(original.get_weights())
    replacement = built_from_values(
        lambda: {component: type(original).from_config(original.get_config())},
        lambda v: next(weights) + rng.normal(0, 0.1, v.shape).astype(v.dtype),
    )[component]
    try:
        setattr(tiny, component, replacement)
        after = tiny.text_to_image("a red circle", **kwargs)
        assert np.abs(after.astype(int) - before.astype(int)).mean() > 1.0
    finally:
        setattr(tiny, component, original)


def test_assigned_scheduler_is_used_on_the_next_call(tiny, eager_on_tensorflow):
    # The other tests' step count: on JAX their compiled loop serves both schedulers.
    kwargs = dict(num_steps=2, seed=4, progress=False)
    before = tiny.text_to_image("a red circle", **kwargs)
    original = tiny.scheduler
    try:
        tiny.scheduler = DDIMScheduler(timestep_spacing="trailing")
        after = tiny.text_to_image("a red circle", **kwargs)
    finally:
        tiny.scheduler = original
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 0.1


def test_scheduler_by_name(tiny):
    assert {"ddim", "DDIMScheduler"} <= set(scheduler_names())
    sd = StableDiffusion(32, 32, config="tiny", scheduler="DDIMScheduler")
    assert isinstance(sd.scheduler, DDIMScheduler)
    kwargs = dict(num_steps=2, seed=4, progress=False)
    np.testing.assert_array_equal(
        tiny.text_to_image("a red circle", scheduler="ddim", **kwargs),
        tiny.text_to_image("a red circle", **kwargs),
    )
    with pytest.raises(ValueError, match="scheduler must be one of"):
        tiny.text_to_image("a red circle", scheduler="euler-magic", **kwargs)
    with pytest.raises(TypeError, match="scheduler must be"):
        StableDiffusion(32, 32, config="tiny", scheduler=3)


def test_config_names_the_scheduler_class():
    from keras_sd.presets import resolve_model_config

    config = resolve_model_config("tiny")
    config["scheduler"] = {"class_name": "DDIMScheduler", "eta": 0.5}
    sd = StableDiffusion(32, 32, config=config)
    assert isinstance(sd.scheduler, DDIMScheduler) and sd.scheduler.eta == 0.5
    config["scheduler"] = {"class_name": "NoSuchScheduler"}
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        StableDiffusion(32, 32, config=config)


def test_added_token_without_embedding_row_is_refused(tiny):
    from keras_sd.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()
    tokenizer.add_tokens(["<new-thing>"])
    # The tiny model's components: what is checked is the tokenizer's.
    sd = StableDiffusion(
        32, 32, config="tiny", tokenizer=tokenizer, **{p: getattr(tiny, p) for p in MODELS}
    )
    with pytest.raises(ValueError, match="token embeddings"):
        sd.encode_text("a <new-thing>")
    assert sd.encode_text("a red circle").shape[1] == 77
