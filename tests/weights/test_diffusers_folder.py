"""diffusers folders as diffusers and transformers write them: fp16 variants, sharded
weights, rectangular sample sizes, and the settings and shard names keras-sd refuses.

Every folder here is written by diffusers' or transformers' own `save_pretrained` /
`save_config` from tiny random models; keras-sd must read back the very values saved.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import randomize_torch_module, torch_state_dict

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from keras_sd import StableDiffusion  # noqa: E402
from keras_sd.weights import diffusers_folder  # noqa: E402
from keras_sd.weights.diffusers import export_components  # noqa: E402
from keras_sd.weights.state_dict import CheckpointError  # noqa: E402
from tiny_components import FOLDER_UNET as UNET  # noqa: E402
from tiny_components import TEXT, VAE  # noqa: E402


def _models(unet_sample_size=8, seed=0):
    models = {
        "unet": diffusers.UNet2DConditionModel(**{**UNET, "sample_size": unet_sample_size}),
        "vae": diffusers.AutoencoderKL(**VAE),
        "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)),
    }
    for n, model in enumerate(models.values()):
        randomize_torch_module(model, seed=seed + n)
    return models


def _save(models, folder: Path, **save_kwargs) -> Path:
    for component, model in models.items():
        model.save_pretrained(folder / component, **save_kwargs)
    return folder


def _assert_loaded_values(sd, models, dtype=np.float32):
    """keras-sd's weights, exported back to diffusers names, equal the saved tensors."""
    exported = export_components(sd)
    for component, model in models.items():
        saved = torch_state_dict(model)
        if component == "text_encoder":
            saved = {"text_model." + k.removeprefix("text_model."): v for k, v in saved.items()}
            saved = {k: v for k, v in saved.items() if not k.endswith("position_ids")}
        assert sorted(exported[component]) == sorted(saved), component
        for key, value in saved.items():
            np.testing.assert_array_equal(
                np.asarray(exported[component][key], np.float32),
                value.astype(dtype).astype(np.float32),
                err_msg=f"{component} {key}",
            )


def test_sharded_fp16_variant_folder_loads_every_shard(tmp_path):
    models = _models()
    folder = _save(models, tmp_path / "model", variant="fp16", max_shard_size="60KB")
    for component, index in (
        ("unet", "diffusion_pytorch_model.safetensors.index.fp16.json"),
        ("vae", "diffusion_pytorch_model.safetensors.index.fp16.json"),
        ("text_encoder", "model.safetensors.index.fp16.json"),
    ):
        shards = set(json.loads((folder / component / index).read_text())["weight_map"].values())
        assert len(shards) > 1, component  # the folder really is sharded

    sd = StableDiffusion.from_checkpoint(folder)

    _assert_loaded_values(sd, models)


def test_fp16_variant_stored_in_float16_is_read_exactly(tmp_path):
    models = _models(seed=3)
    for model in models.values():
        model.to(torch.float16)
    folder = _save(models, tmp_path / "model", variant="fp16", max_shard_size="60KB")

    sd = StableDiffusion.from_checkpoint(folder)

    _assert_loaded_values(sd, models, dtype=np.float16)


def test_missing_weights_error_names_files_diffusers_writes(tmp_path):
    models = _models()
    _save(models, tmp_path / "model")
    for path in (tmp_path / "model" / "unet").glob("*.safetensors"):
        path.unlink()
    with pytest.raises(CheckpointError) as info:
        StableDiffusion.from_checkpoint(tmp_path / "model")
    message = str(info.value)
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in message
    assert "fp16.safetensors.index" not in message  # a name diffusers never writes


def test_rectangular_unet_sample_size_sets_height_and_width(tmp_path):
    sample_size = (8, 12)  # [height, width], as diffusers stores it
    models = _models(unet_sample_size=list(sample_size))
    folder = _save(models, tmp_path / "model")
    assert json.loads((folder / "unet" / "config.json").read_text())["sample_size"] == list(
        sample_size
    )

    sd = StableDiffusion.from_checkpoint(folder)

    factor = 2 ** (len(VAE["block_out_channels"]) - 1)
    assert (sd.img_height, sd.img_width) == (sample_size[0] * factor, sample_size[1] * factor)
    image = sd.text_to_image("a red circle", num_steps=1, seed=0)
    assert image.shape == (1, sample_size[0] * factor, sample_size[1] * factor, 3)


def test_saved_rectangular_folder_keeps_its_size(tmp_path):
    sd = StableDiffusion(32, 48, config="tiny")
    sd.save_checkpoint(tmp_path / "folder", layout="diffusers")
    config = json.loads((tmp_path / "folder" / "unet" / "config.json").read_text())
    assert config["sample_size"] == [32 // sd.latent_factor, 48 // sd.latent_factor]

    again = StableDiffusion.from_checkpoint(tmp_path / "folder", config="tiny")

    assert (again.img_height, again.img_width) == (32, 48)


def test_bad_sample_size_is_a_checkpoint_error(tmp_path):
    folder = _save(_models(), tmp_path / "model")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": [8]}))
    with pytest.raises(CheckpointError, match=r"sample_size.*\[height, width\]"):
        StableDiffusion.from_checkpoint(folder)


def test_unsupported_scheduler_is_refused_before_any_weights_load(tmp_path, monkeypatch):
    folder = _save(_models(), tmp_path / "model")
    diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_config(folder / "scheduler")
    reads = []
    monkeypatch.setattr(diffusers_folder, "read_weights_file", lambda path: reads.append(path))

    with pytest.raises(CheckpointError, match="beta_schedule.*squaredcos_cap_v2") as info:
        StableDiffusion.from_checkpoint(folder)

    assert str(folder) in str(info.value)
    assert reads == []


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "sub/../../x.bin"])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, monkeypatch, shard):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"marker: must never be opened")
    shard = str(outside) if shard == "ABSOLUTE" else shard
    folder = _save(_models(), tmp_path / "model", max_shard_size="60KB")
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = sorted(content["weight_map"])[0]
    content["weight_map"][first] = shard
    index.write_text(json.dumps(content))
    opened = []
    real_read = diffusers_folder.read_weights_file
    monkeypatch.setattr(
        diffusers_folder, "read_weights_file", lambda p: opened.append(p) or real_read(p)
    )

    with pytest.raises(CheckpointError, match="shard"):
        StableDiffusion.from_checkpoint(folder)

    assert all(Path(p).resolve().parent == (folder / "unet").resolve() for p in opened), opened
    assert not any(Path(p).resolve() == outside.resolve() for p in opened)
