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


def tiny(seed: int) -> StableDiffusion:
    keras.utils.set_random_seed(seed)
    return StableDiffusion(32, 32, config="tiny", jit_compile=False)


def generate(sd) -> np.ndarray:
    return sd.text_to_image("a red circle", num_steps=2, seed=3, progress=False)


def test_a_second_pipeline_reuses_the_traces_with_its_own_weights(fresh_programs):
    first, second = tiny(0), tiny(1)
    from_first = generate(first)
    count = len(programs._programs)
    shared = generate(second)
    assert (first.sampler.trace_count, second.sampler.trace_count) == (1, 0)
    assert len(programs._programs) == count  # text encoder and decoder programs reused too
    backend.clear_shared_programs()
    alone = generate(second)
    assert second.sampler.trace_count == 1
    np.testing.assert_array_equal(shared, alone)
    assert np.abs(from_first.astype(int) - shared.astype(int)).mean() > 1.0


def test_shared_programs_keep_no_pipeline_alive(fresh_programs):
    first, second = tiny(0), tiny(1)
    generate(first)
    models = [weakref.ref(getattr(first, name)) for name in ("diffusion_model", "decoder")]
    del first
    gc.collect()
    generate(second)
    assert second.sampler.trace_count == 0
    assert [model() for model in models] == [None, None]


def test_another_architecture_or_conv_algorithm_traces_its_own(fresh_programs):
    sd = tiny(0)
    generate(sd)
    config = StableDiffusion(32, 32, config="tiny").config
    config["unet"]["layers_per_block"] += 1
    other = StableDiffusion(32, 32, config=config, jit_compile=False)
    generate(other)
    assert other.sampler.trace_count == 1
    previous = set_conv_algorithm("direct" if previous_is_auto() else "auto")
    try:
        generate(sd)
    finally:
        set_conv_algorithm(previous)
    assert sd.sampler.trace_count == 2


def previous_is_auto() -> bool:
    previous = set_conv_algorithm("auto")
    set_conv_algorithm(previous)
    return previous == "auto"


class Shifted(VAEDecoder):
    """A subclass whose output depends on an attribute its config does not list."""

    def __init__(self, shift=0.0, **kwargs):
        super().__init__(**kwargs)
        self.shift = shift

    def call(self, latents):
        return super().call(latents) + self.shift


def test_subclasses_share_nothing():
    config = StableDiffusion(32, 32, config="tiny").config["vae"]
    decoders = [Shifted(shift, **config) for shift in (0.0, 1.0)]
    decoders[1].set_weights(decoders[0].get_weights())
    assert backend.architecture_key(decoders[0]) != backend.architecture_key(decoders[1])
    latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype("float32")
    outputs = [
        np.asarray(backend.shared_stateless(d, False)(backend.model_state(d), latents))
        for d in decoders
    ]
    np.testing.assert_allclose(outputs[1] - outputs[0], 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["block_out_channels", "dtype"])
def test_the_key_tells_configs_and_dtypes_apart(name):
    config = StableDiffusion(32, 32, config="tiny").config["vae"]
    base = VAEDecoder(**config)
    changed = (
        VAEDecoder(**{**config, name: [c * 2 for c in config[name]]})
        if name == "block_out_channels"
        else VAEDecoder(**config, dtype="bfloat16")
    )
    assert backend.architecture_key(VAEDecoder(**config)) == backend.architecture_key(base)
    assert backend.architecture_key(changed) != backend.architecture_key(base)
