"""Compiled programs shared by the pipelines of one architecture in a process
(`keras_sd.backend.programs`): reused traces, each pipeline's own weights, no model
kept alive, and a new program where the architecture or a trace setting differs."""

import gc
import weakref

import keras
import numpy as np
import pytest

from keras_sd import StableDiffusion, backend
from keras_sd.backend import programs
from keras_sd.models.conv import set_conv_algorithm
from keras_sd.models.vae import VAEDecoder
from keras_sd.presets import resolve_model_config


def tiny(seed: int) -> StableDiffusion:
    keras.utils.set_random_seed(seed)
    return StableDiffusion(32, 32, config="tiny", jit_compile=False)


def generate(sd) -> np.ndarray:
    return sd.text_to_image("a red circle", num_steps=2, seed=3, progress=False)


def test_a_second_pipeline_reuses_the_traces_with_its_own_weights(fresh_programs):
    first, second = tiny(0), tiny(1)
    from_first = generate(first)
    count = len(programs._programs)
    models = [weakref.ref(getattr(first, name)) for name in ("diffusion_model", "decoder")]
    del first
    gc.collect()
    assert [model() for model in models] == [None, None]  # the programs keep no weights
    shared = generate(second)
    assert second.sampler.trace_count == 0
    assert len(programs._programs) == count  # text encoder and decoder programs reused too
    backend.clear_shared_programs()
    alone = generate(second)
    assert second.sampler.trace_count == 1
    np.testing.assert_array_equal(shared, alone)
    assert np.abs(from_first.astype(int) - shared.astype(int)).mean() > 1.0


def decode(decoder) -> np.ndarray:
    """`decoder` on fixed latents through its shared program."""
    latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype("float32")
    call = backend.shared_stateless(decoder, jit_compile=False)
    return np.asarray(call(backend.model_state(decoder), latents))


def test_another_config_or_conv_algorithm_gets_its_own_program(fresh_programs):
    config = resolve_model_config("tiny")["vae"]
    base, wider_eps = VAEDecoder(**config), VAEDecoder(**{**config, "norm_eps": 1.0})
    wider_eps.set_weights(base.get_weights())  # the same weight shapes and values
    assert np.abs(decode(base) - decode(wider_eps)).max() > 1e-3
    count = len(programs._programs)
    previous = set_conv_algorithm("direct")
    try:
        if previous == "direct":
            set_conv_algorithm("auto")
        decode(base)
    finally:
        set_conv_algorithm(previous)
    assert len(programs._programs) == count + 1


class Shifted(VAEDecoder):
    """A subclass whose output depends on an attribute its config does not list."""

    def __init__(self, shift=0.0, **kwargs):
        super().__init__(**kwargs)
        self.shift = shift

    def call(self, latents):
        return super().call(latents) + self.shift


def test_subclasses_share_nothing():
    config = resolve_model_config("tiny")["vae"]
    decoders = [Shifted(shift, **config) for shift in (0.0, 1.0)]
    decoders[1].set_weights(decoders[0].get_weights())
    assert backend.architecture_key(decoders[0]) != backend.architecture_key(decoders[1])
    np.testing.assert_allclose(decode(decoders[1]) - decode(decoders[0]), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "change",
    [{"block_out_channels": [64, 128]}, {"norm_eps": 1.0}, {"dtype": "bfloat16"}],
    ids=["width", "epsilon", "dtype"],
)
def test_the_key_tells_configs_and_dtypes_apart(change):
    config = resolve_model_config("tiny")["vae"]
    base, changed = VAEDecoder(**config), VAEDecoder(**{**config, **change})
    assert backend.architecture_key(VAEDecoder(**config)) == backend.architecture_key(base)
    assert backend.architecture_key(changed) != backend.architecture_key(base)
