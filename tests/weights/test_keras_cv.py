"""KerasCV interop: KerasCV-built models (random weights, nothing downloaded) and their .h5
files load into keras-sd and give KerasCV's outputs.

KerasCV's models are fixed at SD size (no tiny configs), so these are full-size
components. KerasCV deviates slightly from the reference SD models keras-sd
implements: a tanh-approximated GELU in the UNet feed-forward (and in the SD 2.x
text encoder) and GroupNorm epsilon 1e-5 in the VAE (1e-6). The full-model tests
give the KerasCV models the reference GELU and epsilon, so that what is measured
is the weight mapping; the VAE tests measure both ways.
"""

import gc
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from conftest import (
    FULL_SIZE,
    max_abs_normalized_error,
    random_keras_cv_models,
    randomize_keras_model,
)

pytest.importorskip("keras_cv")
# Full-size models: these run on the same xdist worker as the slow tests (conftest.py).
pytestmark = pytest.mark.xdist_group(FULL_SIZE)

from keras.src.legacy.saving import legacy_h5_format  # noqa: E402
from keras_cv.src.models.stable_diffusion import (  # noqa: E402
    decoder as kcv_decoder,
)
from keras_cv.src.models.stable_diffusion import (  # noqa: E402
    diffusion_model as kcv_unet,
)
from keras_cv.src.models.stable_diffusion import (  # noqa: E402
    image_encoder as kcv_encoder,
)
from keras_cv.src.models.stable_diffusion import (  # noqa: E402
    text_encoder as kcv_text,
)

from keras_sd import StableDiffusion  # noqa: E402
from keras_sd.models import clip_text, unet, vae  # noqa: E402
from keras_sd.tokenizer import CLIPTokenizer  # noqa: E402
from keras_sd.weights.keras_cv import (  # noqa: E402
    load_keras_cv_weights,
    match_keras_cv,
    read_keras_cv_h5,
)
from keras_sd.weights.state_dict import CheckpointError  # noqa: E402

TOLERANCE = 1e-4
SCALE = vae.SD1_CONFIG["scaling_factor"]
PROMPT = "a photograph of an astronaut riding a horse"


def _exact_gelu_geglu(self, inputs):
    x = self.dense(inputs)
    x, gate = x[..., : self.output_dim], x[..., self.output_dim :]
    return x * keras.ops.gelu(gate, approximate=False)


def _load(component, ours, kcv_model):
    arrays = [np.asarray(w.numpy()) for w in kcv_model.weights]
    for variable, value in match_keras_cv(component, ours, arrays, "test"):
        variable.assign(value())
    return ours


def _timestep_embedding(t: int, dim: int = 320) -> np.ndarray:
    # KerasCV feeds its UNet this precomputed sinusoidal embedding ([cos, sin]).
    freqs = np.exp(-np.log(10000.0) * np.arange(dim // 2) / (dim // 2))
    args = t * freqs
    return np.concatenate([np.cos(args), np.sin(args)])[None].astype("float32")


def _outputs(component, model, kcv: bool, inputs):
    """One forward pass; KerasCV's models take differently scaled/extra inputs."""
    if component == "text_encoder":
        if kcv:
            return model([inputs["ids"], np.arange(77, dtype="int32")[None]])
        return model(inputs["ids"])
    if component == "decoder":  # KerasCV divides by the VAE scale itself
        return model(inputs["z"]) if kcv else model(inputs["z"] / SCALE)
    if component == "image_encoder":  # KerasCV returns the scaled mean only
        return model(inputs["image"]) if kcv else model(inputs["image"])[..., :4] * SCALE
    if kcv:
        return model([inputs["latents"], _timestep_embedding(371), inputs["context"]])
    return model(inputs["latents"], np.array([371]), inputs["context"])


def _inputs(context_dim=768, pad="<|endoftext|>"):
    rng = np.random.default_rng(1)
    return {
        "ids": CLIPTokenizer(pad_token=pad)([PROMPT]).astype("int32"),
        "z": rng.standard_normal((1, 4, 4, 4)).astype("float32"),
        "image": rng.uniform(-1, 1, (1, 16, 16, 3)).astype("float32"),
        "latents": rng.standard_normal((1, 8, 8, 4)).astype("float32"),
        "context": rng.standard_normal((1, 77, context_dim)).astype("float32"),
    }


def _error(component, ours, expected, inputs) -> float:
    """`ours`' error against `expected`, KerasCV's outputs for `inputs`."""
    return max_abs_normalized_error(np.asarray(_outputs(component, ours, False, inputs)), expected)


@pytest.mark.parametrize(
    "component, build_kcv, build_ours, bound",
    [
        (
            "text_encoder",
            lambda: kcv_text.TextEncoder(77, download_weights=False),
            lambda: clip_text.CLIPTextEncoder(**clip_text.SD1_CONFIG),
            TOLERANCE,
        ),
        (
            "decoder",
            lambda: kcv_decoder.Decoder(64, 64, download_weights=False),
            lambda: vae.VAEDecoder(**vae.SD1_CONFIG),
            1e-3,  # GroupNorm epsilon 1e-5 (KerasCV) vs 1e-6
        ),
        (
            "image_encoder",
            lambda: kcv_encoder.ImageEncoder(download_weights=False),
            lambda: vae.VAEEncoder(**vae.SD1_CONFIG),
            1e-3,
        ),
    ],
)
def test_component_matches_keras_cv(component, build_kcv, build_ours, bound):
    kcv_model = build_kcv()
    randomize_keras_model(kcv_model, seed=3)
    inputs = _inputs()
    expected = np.asarray(_outputs(component, kcv_model, True, inputs))
    ours = build_ours()
    assert _error(component, ours, expected, inputs) > 0.1  # not yet loaded: far off
    ours = _load(component, ours, kcv_model)
    error = _error(component, ours, expected, inputs)
    print(f"{component}: {error:.2e}")
    assert error < bound
    if bound > TOLERANCE:  # the same epsilon as KerasCV leaves only the mapping to measure
        config = {**vae.SD1_CONFIG, "norm_eps": 1e-5}
        same_eps = _load(component, type(ours)(**config), kcv_model)
        error = _error(component, same_eps, expected, inputs)
        print(f"{component} with KerasCV's epsilon: {error:.2e}")
        assert error < TOLERANCE


@pytest.mark.parametrize("fmt", ["legacy.h5", "keras3.weights.h5"])
def test_h5_files_load(tmp_path, fmt):
    kcv_model = kcv_decoder.Decoder(64, 64, download_weights=False)
    randomize_keras_model(kcv_model, seed=5)
    path = tmp_path / f"decoder_{fmt}"
    if fmt == "legacy.h5":  # the format of KerasCV's published weights
        import h5py

        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, kcv_model)
    else:
        kcv_model.save_weights(path)

    arrays = read_keras_cv_h5(path)

    assert len(arrays) == len(kcv_model.weights)
    for array, weight in zip(arrays, kcv_model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(array), weight.numpy())
    ours = SimpleNamespace(decoder=vae.VAEDecoder(**vae.SD1_CONFIG, norm_eps=1e-5))
    load_keras_cv_weights(ours, decoder=path)
    inputs = _inputs()
    expected = np.asarray(_outputs("decoder", kcv_model, True, inputs))
    assert _error("decoder", ours.decoder, expected, inputs) < TOLERANCE
    with pytest.raises(CheckpointError, match="no KerasCV text_encoder, diffusion_model weights"):
        StableDiffusion.from_checkpoint([path])


def test_wrong_component_is_refused():
    kcv_model = kcv_encoder.ImageEncoder(download_weights=False)
    arrays = [np.asarray(w.numpy()) for w in kcv_model.weights]
    with pytest.raises(CheckpointError, match="holds 108 weights; a KerasCV decoder"):
        match_keras_cv("decoder", vae.VAEDecoder(**vae.SD1_CONFIG), arrays, "enc.h5")
    swapped = arrays[:2][::-1] + arrays[2:]  # same count, shapes out of order
    with pytest.raises(CheckpointError, match=r"weight #0 has shape \(128,\)"):
        match_keras_cv("image_encoder", vae.VAEEncoder(**vae.SD1_CONFIG), swapped, "enc.h5")


def test_in_memory_conversion_runs_with_the_garbage_collector_paused(monkeypatch):
    from keras_sd.weights import keras_cv as keras_cv_weights

    seen = []  # what the build of the keras-sd models would see
    monkeypatch.setattr(keras_cv_weights, "_assemble", lambda *args: seen.append(gc.isenabled()))
    keras_cv_weights.keras_cv_kwargs(decoder=SimpleNamespace(weights=[]))
    assert seen == [False] and gc.isenabled()


class KerasCVUser(StableDiffusion):
    """A user's subclass: loading must return it, not the base class."""


def _kcv_components(version: str) -> dict:
    v2 = version == "sd2"
    text = kcv_text.TextEncoderV2 if v2 else kcv_text.TextEncoder
    unet_cls = kcv_unet.DiffusionModelV2 if v2 else kcv_unet.DiffusionModel
    # Built straight from seeded random values (the n-th model from seed n), without
    # running KerasCV's initializers first (their values would be overwritten anyway).
    models = random_keras_cv_models(
        {
            "text_encoder": lambda: text(77, download_weights=False),
            "diffusion_model": lambda: unet_cls(64, 64, 77, download_weights=False),
            "decoder": lambda: kcv_decoder.Decoder(64, 64, download_weights=False),
            "image_encoder": lambda: kcv_encoder.ImageEncoder(download_weights=False),
        },
        std=0.02,
    )
    # The reference SD's VAE epsilon and OpenCLIP's exact GELU, so only the mapping differs.
    for name in ("decoder", "image_encoder"):
        for layer in models[name]._flatten_layers():
            if isinstance(layer, keras.layers.GroupNormalization):
                layer.epsilon = 1e-6
    for layer in models["text_encoder"]._flatten_layers():
        if v2 and isinstance(layer, kcv_text.CLIPEncoderLayer):
            layer.activation = lambda x: keras.ops.gelu(x, approximate=False)
    return models


def _all_errors(sd, expected, inputs) -> dict:
    return {
        c: max_abs_normalized_error(np.asarray(_outputs(c, getattr(sd, c), False, inputs)), e)
        for c, e in expected.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_full_keras_cv_model_converts_and_h5_files_load(tmp_path, monkeypatch, version):
    import h5py
    import keras_cv

    kcv_models = _kcv_components(version)
    context_dim = unet.SD2_CONFIG if version == "sd2" else unet.SD1_CONFIG
    inputs = _inputs(
        context_dim["cross_attention_dim"], "!" if version == "sd2" else "<|endoftext|>"
    )
    monkeypatch.setattr(kcv_unet.GEGLU, "call", _exact_gelu_geglu)
    expected = {c: np.asarray(_outputs(c, m, True, inputs)) for c, m in kcv_models.items()}
    # KerasCV published no SD 2.x image encoder: its files are the other three.
    published = [c for c in kcv_models if version == "sd1" or c != "image_encoder"]
    paths = []
    for component in published:
        model = kcv_models[component]
        paths.append(tmp_path / f"{component}.h5")
        with h5py.File(paths[-1], "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)

    pipeline_cls = (
        keras_cv.models.StableDiffusionV2 if version == "sd2" else keras_cv.models.StableDiffusion
    )
    kcv_sd = pipeline_cls(img_width=128, img_height=128)  # KerasCV rounds sizes to 128
    for component, model in kcv_models.items():  # what KerasCV builds lazily, prebuilt
        setattr(kcv_sd, f"_{component}", model)
    converted = KerasCVUser.from_keras_cv(kcv_sd)
    assert type(converted) is KerasCVUser  # subclasses load as themselves
    del kcv_sd, kcv_models
    gc.collect()
    errors = {
        c: max_abs_normalized_error(
            np.asarray(_outputs(c, getattr(converted, c), False, inputs)), e
        )
        for c, e in expected.items()
    }
    print(f"{version} from_keras_cv: {errors}")
    assert (converted.img_width, converted.img_height) == (128, 128)
    assert converted.scheduler.prediction_type == "epsilon"
    del converted
    gc.collect()

    if version == "sd2":  # the image encoder is optional
        expected.pop("image_encoder")
        with pytest.warns(UserWarning, match="no KerasCV image encoder"):
            loaded = StableDiffusion.from_checkpoint(paths[::-1], img_width=64, img_height=64)
    else:
        loaded = StableDiffusion.from_checkpoint(paths[::-1], img_width=64, img_height=64)
    h5_errors = _all_errors(loaded, expected, inputs)
    print(f"{version} h5 files: {h5_errors}")
    for found in (errors, h5_errors):
        assert max(found.values()) < TOLERANCE, found
