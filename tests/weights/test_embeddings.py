"""Textual-inversion embedding files: round trips in both layouts, diffusers' own files and
loader on the same random weights, AUTOMATIC1111 `.pt` without running pickle code, errors."""

import os

import keras
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFTokenizer

from conftest import randomize_torch_module, torch_state_dict
from keras_sd import StableDiffusion
from keras_sd.models.clip_text import TINY_CONFIG
from keras_sd.weights.embeddings import read_embedding, write_embedding
from keras_sd.weights.safe_pickle import UnsafeCheckpointError
from keras_sd.weights.state_dict import load_state_dict

WIDTH = TINY_CONFIG["hidden_dim"]


@pytest.fixture(scope="module")
def sd():
    keras.utils.set_random_seed(0)
    return StableDiffusion(64, 64, config="tiny", jit_compile=False)


def vectors(n, width=WIDTH, seed=0):
    return np.random.default_rng(seed).standard_normal((n, width)).astype("float32")


@pytest.mark.parametrize("layout", ["diffusers", "a1111"])
@pytest.mark.parametrize("num_vectors", [1, 3])
def test_save_then_load_gives_the_same_bits(sd, tmp_path, layout, num_vectors):
    token = f"<rt-{layout}-{num_vectors}>"
    sd.add_tokens(token, vectors=vectors(num_vectors, seed=num_vectors))
    path = tmp_path / f"{token}.safetensors"
    sd.save_textual_inversion(path, token, layout=layout)
    stored, read = read_embedding(path)
    assert stored == token  # diffusers: the key; a1111: the file's stem
    np.testing.assert_array_equal(read, sd.token_vectors(token))
    ids = sd.load_textual_inversion(path, token=f"{token}-again")
    assert len(ids) == num_vectors
    np.testing.assert_array_equal(sd.token_vectors(f"{token}-again"), sd.token_vectors(token))


def tiny_diffusers_text_encoder(tmp_path):
    """A transformers CLIP text model with random weights, its tokenizer files written by
    keras-sd's tokenizer, and a keras-sd pipeline holding the same weights."""
    cfg = TINY_CONFIG
    hf = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg["max_length"],
            hidden_size=cfg["hidden_dim"],
            num_hidden_layers=cfg["num_layers"],
            num_attention_heads=cfg["num_heads"],
            intermediate_size=cfg["intermediate_dim"],
            hidden_act=cfg["activation"],
            layer_norm_eps=cfg["layer_norm_epsilon"],
        )
    ).eval()
    randomize_torch_module(hf, seed=1, std=0.2)
    ours = StableDiffusion(64, 64, config="tiny", jit_compile=False)
    state = {k.removeprefix("text_model."): v for k, v in torch_state_dict(hf).items()}
    load_state_dict(ours.text_encoder, state, ignore=("position_ids",))
    ours.tokenizer.save_vocabulary(tmp_path)
    tokenizer = HFTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>"
    )
    return hf, tokenizer, ours


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_diffusers_file_and_loader_give_the_same_text_embedding(tmp_path, num_vectors):
    from diffusers.loaders import TextualInversionLoaderMixin

    hf, tokenizer, ours = tiny_diffusers_text_encoder(tmp_path)
    learned = torch.from_numpy(vectors(num_vectors, seed=7) * 0.2)
    path = str(tmp_path / "learned_embeds.safetensors")
    # How diffusers' textual_inversion.py example saves its result.
    safetensors.torch.save_file({"<cat-toy>": learned}, path, metadata={"format": "pt"})

    class Loader(TextualInversionLoaderMixin):  # a pipeline without offloading
        hf_device_map = None
        components = {}

    Loader().load_textual_inversion(path, tokenizer=tokenizer, text_encoder=hf)
    prompt = "a photo of a <cat-toy> on a table"
    expanded = Loader().maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer(expanded, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(ids).last_hidden_state.numpy()

    assert ours.load_textual_inversion(path) == list(range(49408, 49408 + num_vectors))
    np.testing.assert_array_equal(ours.tokenizer(prompt)[0], ids[0].numpy())
    actual = keras.ops.convert_to_numpy(ours.encode_text(prompt))
    assert np.abs(actual - expected).max() <= 1e-5


def a1111_embedding(vecs: np.ndarray) -> dict:
    """The dict AUTOMATIC1111's web UI saves for an embedding."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.from_numpy(vecs).requires_grad_()},
        "name": "my-style",
        "step": 1500,
        "sd_checkpoint": "81761151",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }


@pytest.mark.parametrize("num_vectors", [1, 4])
def test_a1111_pt_and_safetensors_load(sd, tmp_path, num_vectors):
    vecs = vectors(num_vectors, seed=11)
    torch.save(a1111_embedding(vecs), tmp_path / "style.pt")
    token, read = read_embedding(tmp_path / "style.pt")
    assert token == "my-style"
    np.testing.assert_array_equal(read, vecs)
    safetensors.torch.save_file(
        {"emb_params": torch.from_numpy(vecs)}, tmp_path / "look.safetensors"
    )
    assert read_embedding(tmp_path / "look.safetensors")[0] == "look"
    sd.load_textual_inversion(tmp_path / "look.safetensors", token=f"<look-{num_vectors}>")
    np.testing.assert_array_equal(sd.token_vectors(f"<look-{num_vectors}>"), vecs)
    assert len(sd.tokenizer.encode(f"a <look-{num_vectors}> photo")) == 4 + num_vectors


class Payload:
    """Unpickling this object under a plain unpickler creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a1111_pt_with_a_payload_is_refused_and_nothing_runs(sd, tmp_path):
    marker = tmp_path / "pwned"
    data = a1111_embedding(vectors(1))
    data["sd_checkpoint"] = Payload(marker)
    torch.save(data, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        sd.load_textual_inversion(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "evil" not in sd.tokenizer.added_tokens


def test_bad_files_and_widths_give_clear_errors(sd, tmp_path):
    write_embedding(tmp_path / "sd2.safetensors", "<wide>", vectors(1, width=1024))
    with pytest.raises(ValueError, match="width 1024 .* have 32.*SD 2.x"):
        sd.load_textual_inversion(tmp_path / "sd2.safetensors")
    write_embedding(tmp_path / "cat.safetensors", "cat", vectors(1))
    with pytest.raises(ValueError, match="already in the vocabulary"):
        sd.load_textual_inversion(tmp_path / "cat.safetensors")
    safetensors.torch.save_file(
        {"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, tmp_path / "two.safetensors"
    )
    with pytest.raises(ValueError, match="holds no textual-inversion embedding"):
        sd.load_textual_inversion(tmp_path / "two.safetensors")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="holds no textual-inversion embedding"):
        read_embedding(tmp_path / "empty.pt")
    torch.save({"<int>": torch.arange(4)}, tmp_path / "ints.bin")
    with pytest.raises(ValueError, match="not an embedding"):
        read_embedding(tmp_path / "ints.bin")
    with pytest.raises(ValueError, match="extension"):
        read_embedding(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="layout"):
        write_embedding(tmp_path / "x.safetensors", "<x>", vectors(1), layout="comfy")
    with pytest.raises(ValueError, match="safetensors only"):
        write_embedding(tmp_path / "x.bin", "<x>", vectors(1))
    with pytest.raises(ValueError, match="not an added token"):
        sd.save_textual_inversion(tmp_path / "x.safetensors", "<never-added>")


def test_diffusers_bin_loads(sd, tmp_path):
    vecs = vectors(2, seed=5)
    torch.save({"<bin-tok>": torch.from_numpy(vecs)}, tmp_path / "learned_embeds.bin")
    sd.load_textual_inversion(tmp_path / "learned_embeds.bin")
    np.testing.assert_array_equal(sd.token_vectors("<bin-tok>"), vecs)
