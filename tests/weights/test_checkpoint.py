"""Single-file and diffusers-folder checkpoints: ours vs diffusers' own readers and writers.

Random-weight reference models (diffusers UNet and VAE, transformers CLIP text
model) are written to disk in each layout; diffusers reads the files with its
own loaders (offline, with local config folders) and keras-sd with
`load_checkpoint`; the component outputs must agree in float32.
"""

import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    max_abs_normalized_error,
    random_torch_state_dict,
    randomize_torch_module,
    torch_init_skipped,
    torch_state_dict,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import keras_sd  # noqa: E402
from keras_sd import StableDiffusion  # noqa: E402
from keras_sd.conversion import convert  # noqa: E402
from keras_sd.models import clip_text, unet, vae  # noqa: E402
from keras_sd.weights.checkpoint import save_checkpoint  # noqa: E402
from keras_sd.weights.compvis import diffusers_to_compvis  # noqa: E402
from keras_sd.weights.safe_pickle import UnsafeCheckpointError  # noqa: E402
from keras_sd.weights.state_dict import CheckpointError, named_variables  # noqa: E402
from tiny_components import (  # noqa: E402
    CHECKPOINT_UNET,
    CHECKPOINT_VAE,
    FULL_TEXT,
    FULL_UNET,
    FULL_VAE,
    TEXT,
)

SRC = Path(__file__).resolve().parents[2] / "src"
TOLERANCE = 1e-4
COMPONENTS = ("text_encoder", "diffusion_model", "decoder", "image_encoder")

# Reference architectures in diffusers/transformers terms (tests/tiny_components.py), and
# the keras-sd config that supplies what the weights cannot show (heads, groups, activation).
_TINY_TEXT = {**TEXT, "hidden_act": "quick_gelu"}
REFERENCES = {
    "sd1": (CHECKPOINT_UNET, CHECKPOINT_VAE, _TINY_TEXT),
    "sd2": (
        {**CHECKPOINT_UNET, "use_linear_projection": True, "attention_head_dim": (2, 4)},
        CHECKPOINT_VAE,
        {**_TINY_TEXT, "hidden_act": "gelu"},
    ),
}
CONFIGS = {
    "sd1": "tiny",
    "sd2": {
        "tokenizer": {"pad_token": "!"},
        "text_encoder": {**clip_text.TINY_CONFIG, "activation": "gelu"},
        "unet": {**unet.TINY_CONFIG, "num_heads": (2, 4), "use_linear_projection": True},
        "vae": vae.TINY_CONFIG,
        "scheduler": {},
    },
}


def _reference_models(version, seed=0, in_channels=4):
    unet_kwargs, vae_kwargs, text_kwargs = REFERENCES[version]
    models = {
        "unet": diffusers.UNet2DConditionModel(**unet_kwargs, in_channels=in_channels),
        "vae": diffusers.AutoencoderKL(**vae_kwargs),
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_kwargs)),
    }
    for n, model in enumerate(models.values()):
        randomize_torch_module(model, seed=seed + n)
        model.eval()
    return models


def _diffusers_state(models, dtype="float32") -> dict:
    """{component: numpy state dict} with the `text_model.` prefix that files use."""
    text = torch_state_dict(models["text_encoder"])
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}
    parts = {"unet": torch_state_dict(models["unet"]), "vae": torch_state_dict(models["vae"])}
    parts["text_encoder"] = {k: v for k, v in text.items() if not k.endswith("position_ids")}
    return {c: {k: v.astype(dtype) for k, v in s.items()} for c, s in parts.items()}


def _write_config_folder(models, folder: Path) -> Path:
    models["unet"].save_config(folder / "unet")
    models["vae"].save_config(folder / "vae")
    models["text_encoder"].config.save_pretrained(folder / "text_encoder")
    return folder


def _save(flat: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, path)
    else:
        state = {k: torch.from_numpy(np.array(v)) for k, v in flat.items()}
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def _diffusers_single_file(path: Path, config_folder: Path) -> dict:
    """diffusers' own single-file reader, offline with local configs."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        load_single_file_checkpoint,
    )

    folder = str(config_folder)
    kwargs = dict(config=folder, local_files_only=True)
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)  # read once
    return {
        "unet": diffusers.UNet2DConditionModel.from_single_file(
            checkpoint, subfolder="unet", **kwargs
        ),
        "vae": diffusers.AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **kwargs),
        "text_encoder": create_diffusers_clip_model_from_ldm(
            transformers.CLIPTextModel, checkpoint, subfolder="text_encoder", **kwargs
        ),
    }


def _nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def _inputs(in_channels: int, context_dim: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(1, in_channels, 8, 8, generator=gen),
        "context": torch.randn(1, 77, context_dim, generator=gen),
        "z": torch.randn(1, 4, 4, 4, generator=gen),
        "image": torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1,
        "ids": None,
    }


def _reference_outputs(models, inputs) -> dict:
    with torch.no_grad():
        vae_model = models["vae"]
        ids = torch.from_numpy(inputs["ids"]).long()
        return {
            "diffusion_model": _nhwc(
                models["unet"](inputs["latents"], 371, inputs["context"]).sample
            ),
            "decoder": _nhwc(vae_model.decode(inputs["z"]).sample),
            "image_encoder": _nhwc(vae_model.quant_conv(vae_model.encoder(inputs["image"]))),
            "text_encoder": models["text_encoder"](ids).last_hidden_state.numpy(),
        }


def _errors(sd, inputs, reference) -> dict:
    """Max normalized error of each keras-sd component against its torch reference."""
    ours = {
        "diffusion_model": sd.diffusion_model(
            _nhwc(inputs["latents"]), np.array([371]), inputs["context"].numpy()
        ),
        "decoder": sd.decoder(_nhwc(inputs["z"])),
        "image_encoder": sd.image_encoder(_nhwc(inputs["image"])),
        "text_encoder": sd.text_encoder(inputs["ids"]),
    }
    return {k: max_abs_normalized_error(np.asarray(ours[k]), reference[k]) for k in reference}


def _compare(sd, models, seed=0) -> dict:
    config = models["unet"].config
    inputs = _inputs(config.in_channels, config.cross_attention_dim, seed)
    inputs["ids"] = sd.tokenizer(["a red circle on a blue background"])
    return _errors(sd, inputs, _reference_outputs(models, inputs))


def _assert_same_weights(a, b):
    for component in COMPONENTS:
        left, right = named_variables(getattr(a, component)), named_variables(getattr(b, component))
        assert left.keys() == right.keys()
        for name, var in left.items():
            assert np.array_equal(var.numpy(), right[name].numpy()), f"{component}.{name}"


def _assert_models_equal(read, reference):
    for component, model in reference.items():
        want, got = torch_state_dict(model), torch_state_dict(read[component])
        for key, value in want.items():
            if not key.endswith("position_ids"):
                np.testing.assert_array_equal(got[key], value, err_msg=f"{component}.{key}")


@pytest.fixture(scope="module")
def references():
    return {version: _reference_models(version) for version in REFERENCES}


@pytest.mark.parametrize(
    "version, filename",
    [("sd1", "model.safetensors"), ("sd1", "model.ckpt"), ("sd2", "model.safetensors")],
)
def test_single_file_matches_diffusers_reader(tmp_path, references, version, filename):
    models = references[version]
    flat = diffusers_to_compvis(_diffusers_state(models), version)
    path = _save(flat, tmp_path / filename)
    read = _diffusers_single_file(path, _write_config_folder(models, tmp_path / "configs"))
    _assert_models_equal(read, models)  # diffusers understands the file as the references

    sd = StableDiffusion.from_checkpoint(path, config=CONFIGS[version], img_size=64)

    errors = _compare(sd, read)
    print(f"{version} {filename}: {errors}")
    assert max(errors.values()) < TOLERANCE, errors
    assert sd.diffusion_model.use_linear_projection == (version == "sd2")
    assert (sd.img_width, sd.img_height) == (64, 64)


def _tokenizer_folder(folder: Path, pad_token: str) -> None:
    from keras_sd.tokenizer import CLIPTokenizer

    vocab, merges = CLIPTokenizer().save_vocabulary(folder.parent)
    transformers.CLIPTokenizer(vocab, merges, pad_token=pad_token).save_pretrained(folder)


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_diffusers_folder_written_by_diffusers(tmp_path, references, version):
    models = references[version]
    for component, model in models.items():
        model.save_pretrained(tmp_path / "model" / component)
    diffusers.DDIMScheduler(
        prediction_type="v_prediction", beta_schedule="scaled_linear"
    ).save_config(tmp_path / "model" / "scheduler")
    _tokenizer_folder(
        tmp_path / "model" / "tokenizer", "!" if version == "sd2" else "<|endoftext|>"
    )

    sd = StableDiffusion.from_checkpoint(tmp_path / "model")

    errors = _compare(sd, models)
    print(f"{version} diffusers folder: {errors}")
    assert max(errors.values()) < TOLERANCE, errors
    assert sd.scheduler.prediction_type == "v_prediction"
    assert sd.scheduler.beta_schedule == "scaled_linear"
    assert sd.tokenizer.pad_token == ("!" if version == "sd2" else "<|endoftext|>")
    assert sd.img_width == sd.img_height == 16  # unet sample_size 8 x VAE factor 2


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory, references):
    """CompVis single files of the references: {version: path} (float16 storage)."""
    folder = tmp_path_factory.mktemp("files")
    return {
        v: _save(
            diffusers_to_compvis(_diffusers_state(m, "float16"), v), folder / f"{v}.safetensors"
        )
        for v, m in references.items()
    }


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_saved_files_load_in_diffusers(tmp_path, sd_files, version):
    sd = StableDiffusion.from_checkpoint(sd_files[version], config=CONFIGS[version], img_size=64)
    save_checkpoint(sd, tmp_path / "compvis.safetensors")
    save_checkpoint(sd, tmp_path / "folder", layout="diffusers")

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        tmp_path / "folder", local_files_only=True
    )
    folder_errors = _compare(
        sd, {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    )
    configs = _write_config_folder(
        {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}, tmp_path / "cfg"
    )
    file_errors = _compare(sd, _diffusers_single_file(tmp_path / "compvis.safetensors", configs))

    print(f"{version} saved folder: {folder_errors}\n{version} saved file: {file_errors}")
    assert max(folder_errors.values()) < TOLERANCE, folder_errors
    assert max(file_errors.values()) < TOLERANCE, file_errors
    prompt = "a photo of an astronaut"
    np.testing.assert_array_equal(
        pipe.tokenizer([prompt], padding="max_length", max_length=77).input_ids,
        sd.tokenizer([prompt]),
    )
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == sd.scheduler.steps_offset


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_round_trip_is_bit_identical(tmp_path, sd_files, version):
    from safetensors.numpy import load_file

    sd = StableDiffusion.from_checkpoint(sd_files[version], config=CONFIGS[version], img_size=64)
    for layout, path in (("compvis", tmp_path / "a.safetensors"), ("diffusers", tmp_path / "b")):
        save_checkpoint(sd, path, layout=layout)
        _assert_same_weights(
            sd, StableDiffusion.from_checkpoint(path, config=CONFIGS[version], img_size=64)
        )
    # float16 in, float16 out: the very same bytes as the original file.
    convert(sd_files[version], tmp_path / "c.safetensors", dtype="float16", config=CONFIGS[version])
    original, again = load_file(sd_files[version]), load_file(tmp_path / "c.safetensors")
    assert original.keys() == again.keys()
    for key, value in original.items():
        assert value.dtype == again[key].dtype and value.tobytes() == again[key].tobytes(), key


def test_inpainting_unet_is_detected(tmp_path):
    models = _reference_models("sd1", seed=7, in_channels=9)
    path = _save(diffusers_to_compvis(_diffusers_state(models), "sd1"), tmp_path / "inpaint.ckpt")
    read = _diffusers_single_file(path, _write_config_folder(models, tmp_path / "configs"))

    sd = StableDiffusion.from_checkpoint(path, config="tiny")

    assert sd.diffusion_model.in_channels == 9
    errors = _compare(sd, read)
    assert max(errors.values()) < TOLERANCE, errors


def test_ema_weights_are_used_on_request(tmp_path, references):
    models = references["sd1"]
    ema = _reference_models("sd1", seed=11)["unet"]
    flat = diffusers_to_compvis(_diffusers_state(models), "sd1")
    for key, value in diffusers_to_compvis({"unet": torch_state_dict(ema)}).items():
        # LitEma stores `model.<name>` as `model_ema.<name without dots>`.
        flat["model_ema." + key.removeprefix("model.").replace(".", "")] = value
    flat["model_ema.num_updates"] = np.array(1000)
    path = _save(flat, tmp_path / "pruned.safetensors")

    plain = StableDiffusion.from_checkpoint(path, config="tiny")
    with_ema = StableDiffusion.from_checkpoint(path, config="tiny", use_ema=True)

    assert _compare(plain, models)["diffusion_model"] < TOLERANCE
    assert _compare(with_ema, {**models, "unet": ema})["diffusion_model"] < TOLERANCE
    with pytest.raises(CheckpointError, match="no EMA copy"):
        StableDiffusion.from_checkpoint(
            _save(diffusers_to_compvis(_diffusers_state(models)), tmp_path / "x.safetensors"),
            config="tiny",
            use_ema=True,
        )


@pytest.mark.parametrize(
    "filename, kwargs, prediction, size",
    [
        ("v2-1_768-ema-pruned.safetensors", {}, "v_prediction", 768),
        ("v2-1_512-ema-pruned.safetensors", {}, "epsilon", 512),
        ("512-base-ema.safetensors", {}, "epsilon", 512),
        (
            "v2-1_768-ema-pruned.safetensors",
            {"prediction_type": "epsilon", "img_size": 640},
            "epsilon",
            640,
        ),
    ],
)
def test_sd2_prediction_type_and_size_defaults(
    tmp_path, sd_files, filename, kwargs, prediction, size
):
    path = tmp_path / filename
    path.symlink_to(sd_files["sd2"])
    overrides = {k: v for k, v in CONFIGS["sd2"].items() if k in ("unet", "text_encoder", "vae")}
    sd = StableDiffusion.from_checkpoint(path, **overrides, **kwargs)
    assert sd.scheduler.prediction_type == prediction
    assert (sd.img_width, sd.img_height) == (size, size)
    assert sd.tokenizer.pad_token == "!"  # SD 2.x pads like open_clip


def test_pickle_that_runs_code_is_refused(tmp_path, references):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    flat = diffusers_to_compvis(_diffusers_state(references["sd1"]), "sd1")
    state = {k: torch.from_numpy(np.array(v)) for k, v in flat.items()}
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callbacks": Payload()}, path)

    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        StableDiffusion.from_checkpoint(path, config="tiny")
    assert not marker.exists()


def _assert_clean_error(info, *phrases):
    """One paragraph naming the problem, raised by keras-sd itself, no chained backend error."""
    err = info.value
    message = str(err)
    assert "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    # The innermost frame is keras-sd's own code (installed or from src/), not a backend's.
    package_dir = str(Path(keras_sd.__file__).resolve().parent)
    innermost = str(Path(traceback.extract_tb(err.__traceback__)[-1].filename).resolve())
    assert innermost.startswith(package_dir), (innermost, package_dir)
    from keras.src.backend.common import global_state

    assert not global_state.get_global_attribute("uninitialized_variables")


def test_truncated_safetensors(tmp_path, sd_files):
    data = sd_files["sd1"].read_bytes()
    path = tmp_path / "v1-5.safetensors"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError) as info:
        StableDiffusion.from_checkpoint(path, config="tiny")
    _assert_clean_error(info, "v1-5.safetensors", "truncated")


def test_checkpoint_of_another_model(tmp_path, references):
    from safetensors.numpy import save_file

    text = torch_state_dict(references["sd1"]["text_encoder"])
    save_file(text, tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(tmp_path / "clip.safetensors")
    _assert_clean_error(info, "clip.safetensors", "not a Stable Diffusion checkpoint", "diffusers")

    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "classifier.pt")
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(tmp_path / "classifier.pt")
    _assert_clean_error(info, "classifier.pt", "fc.weight")

    unet_only = diffusers_to_compvis({"unet": torch_state_dict(references["sd1"]["unet"])})
    save_file({**unet_only, "conditioner.embedders.0.x": np.ones(1)}, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(tmp_path / "xl.safetensors")
    _assert_clean_error(info, "SDXL")
    save_file(unet_only, tmp_path / "unet_only.safetensors")
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(tmp_path / "unet_only.safetensors")
    _assert_clean_error(info, "no VAE")


def test_missing_component_folder(tmp_path, references):
    for component in ("unet", "text_encoder"):
        references["sd1"][component].save_pretrained(tmp_path / "model" / component)
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(tmp_path / "model")
    _assert_clean_error(info, "no 'vae' folder", "unet/, vae/ and text_encoder/")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        StableDiffusion.from_checkpoint(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_config(tmp_path, sd_files):
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(
            sd_files["sd1"], config="tiny", unet={"transformer_layers_per_block": 2}
        )
    _assert_clean_error(info, "UNet", "missing keys", "transformer_blocks.1")
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(
            sd_files["sd2"], config="tiny", unet={"use_linear_projection": False}
        )
    _assert_clean_error(info, "shape mismatches", "proj_in")


def test_loading_needs_no_torch(tmp_path, sd_files, references):
    ckpt = _save(
        diffusers_to_compvis(_diffusers_state(references["sd1"]), "sd1"), tmp_path / "m.ckpt"
    )
    code = (
        "import sys; from keras_sd import StableDiffusion; "
        f"StableDiffusion.from_checkpoint({str(sd_files['sd1'])!r}, config='tiny'); "
        f"StableDiffusion.from_checkpoint({str(ckpt)!r}, config='tiny'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


# Full-size SD 1.5 and SD 2.1 layouts (the released files' architectures and key sets).
_FULL_VAE = {**FULL_VAE, "sample_size": 512}
_FULL = {
    "sd1": (
        {**FULL_UNET["sd1"], "sample_size": 64},
        {**FULL_TEXT["sd1"], "hidden_act": "quick_gelu", "projection_dim": 768},
    ),
    "sd2": (
        {**FULL_UNET["sd2"], "sample_size": 96, "upcast_attention": True},
        {**FULL_TEXT["sd2"], "projection_dim": 512},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_full_size_single_file_matches_diffusers_reader(tmp_path, version):
    import gc

    from keras_sd.tokenizer import CLIPTokenizer

    unet_kwargs, text_kwargs = _FULL[version]
    configs = tmp_path / "configs"
    parts = {}
    for name, build in (
        ("unet", lambda: diffusers.UNet2DConditionModel(**unet_kwargs)),
        ("vae", lambda: diffusers.AutoencoderKL(**_FULL_VAE)),
        (
            "text_encoder",
            lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_kwargs)),
        ),
    ):
        with torch.device("meta"):  # names, shapes and config only: the file is float16
            model = build()
        state = random_torch_state_dict(model, seed=len(parts), std=0.02, dtype="float16")
        if name == "text_encoder":
            state = {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
            if version == "sd2":  # the diffusers folder keeps 23 of OpenCLIP's 24 blocks
                model.config.num_hidden_layers = 23
            model.config.save_pretrained(configs / name)
        else:
            model.save_config(configs / name)
        parts[name] = state
        del model, state
        gc.collect()
    flat = diffusers_to_compvis(parts, version)
    if version == "sd2":  # released SD 2.x files also hold OpenCLIP's projection head
        rng = np.random.default_rng(0)
        flat["cond_stage_model.model.text_projection"] = rng.standard_normal((1024, 1024)).astype(
            "float16"
        )
        flat["cond_stage_model.model.logit_scale"] = np.array(4.6, dtype="float16")
    path = _save(flat, tmp_path / f"{version}.safetensors")
    del flat, parts
    gc.collect()

    # Its models' every weight comes from the file: one it lacked would differ either way.
    with torch_init_skipped():
        read = _diffusers_single_file(path, configs)
    inputs = _inputs(4, unet_kwargs["cross_attention_dim"])
    inputs["ids"] = CLIPTokenizer(pad_token="!" if version == "sd2" else "<|endoftext|>")(
        ["a photograph of an astronaut riding a horse"]
    )
    reference = _reference_outputs(read, inputs)
    del read
    gc.collect()

    sd = StableDiffusion.from_checkpoint(path)

    errors = _errors(sd, inputs, reference)
    print(f"full-size {version}: {errors}")
    assert max(errors.values()) < TOLERANCE, errors
    assert sd.text_encoder.num_layers == (12 if version == "sd1" else 23)
    assert sd.scheduler.prediction_type == ("epsilon" if version == "sd1" else "v_prediction")
