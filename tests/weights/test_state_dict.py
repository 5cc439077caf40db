"""The PyTorch <-> Keras state-dict mapping, checked against torch modules running the weights.

`weights/state_dict.py` is the one place that knows PyTorch's layouts (Linear [out, in],
Conv2d [out, in, kh, kw]); every loader stands on it. These tests run the same weights in
torch and Keras and compare outputs, so a wrong transpose fails here, not deep in a UNet.
"""

import keras
import numpy as np
import pytest
import torch
from keras import layers

from keras_sd.models.clip_text import TINY_CONFIG, CLIPTextEncoder
from keras_sd.weights import diffusers as diffusers_io
from keras_sd.weights.state_dict import (
    CheckpointError,
    export_state_dict,
    load_state_dict,
    named_variables,
)


class KerasBlock(keras.Model):
    """Embedding -> Dense -> LayerNorm, and a 3x3 conv and a 1x1 "conv" kept as Dense."""

    def __init__(self):
        super().__init__(name="block")
        self.token_embedding = layers.Embedding(11, 6, name="token_embedding")
        self.proj = layers.Dense(5, name="proj")
        self.norm = layers.LayerNormalization(epsilon=1e-5, name="norm")
        self.conv = layers.Conv2D(4, 3, padding="same", name="conv")
        self.proj_out = layers.Dense(3, name="proj_out")

    def call(self, inputs):
        ids, image = inputs
        text = self.norm(self.proj(self.token_embedding(ids)))
        return text, self.proj_out(self.conv(image))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5, eps=1e-5)
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        # Old VAE attention checkpoints store linear maps as 1x1 convolutions.
        self.proj_out = torch.nn.Conv2d(4, 3, 1)

    def forward(self, ids, image):
        text = self.norm(self.proj(self.token_embedding(ids)))
        out = self.proj_out(self.conv(image.permute(0, 3, 1, 2)))
        return text, out.permute(0, 2, 3, 1)


IDS = np.array([[1, 4, 9, 0]], dtype="int32")
IMAGE = np.random.default_rng(0).standard_normal((1, 5, 6, 2)).astype("float32")


def _keras_block():
    model = KerasBlock()
    model((IDS, IMAGE))
    return model


def _torch_block(seed):
    torch.manual_seed(seed)
    module = TorchBlock().eval()
    with torch.no_grad():
        for p in module.parameters():  # LayerNorm starts at 1/0: make every value matter
            p.add_(0.1 * torch.randn_like(p))
    return module


def _torch_outputs(module):
    with torch.no_grad():
        text, image = module(torch.from_numpy(IDS).long(), torch.from_numpy(IMAGE))
    return text.numpy(), image.numpy()


def _weights(model):
    return {name: np.array(var.numpy()) for name, var in named_variables(model).items()}


def test_torch_weights_give_torch_outputs():
    module, model = _torch_block(0), _keras_block()
    load_state_dict(model, module.state_dict())
    for ours, theirs in zip(model((IDS, IMAGE)), _torch_outputs(module), strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)


def test_export_runs_in_torch_unchanged():
    model, module = _keras_block(), TorchBlock().eval()
    exported = export_state_dict(model)
    # The Dense kept for a 1x1 conv exports as [out, in]; torch wants [out, in, 1, 1].
    exported["proj_out.weight"] = exported["proj_out.weight"][:, :, None, None]
    module.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in exported.items()}
    )
    for ours, theirs in zip(model((IDS, IMAGE)), _torch_outputs(module), strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)


def test_names_follow_the_layer_tree():
    names = set(named_variables(_keras_block()))
    assert names == set(TorchBlock().state_dict())


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda sd: sd.pop("proj.bias"), "1 missing keys: proj.bias"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), "1 unexpected keys: extra.weight"),
        (
            lambda sd: sd.update({"conv.bias": torch.zeros(7)}),
            "1 shape mismatches: conv.bias (file (7,), model (4,))",
        ),
    ],
    ids=["missing", "unexpected", "mismatched"],
)
def test_strict_refusal_names_the_key_and_assigns_nothing(edit, expected):
    model = _keras_block()
    before = _weights(model)
    state = dict(_torch_block(1).state_dict())
    edit(state)
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_state_dict(model, state)
    after = _weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_non_strict_assigns_what_matches():
    model = _keras_block()
    state = dict(_torch_block(2).state_dict())
    state.pop("proj.bias")
    before = _weights(model)
    load_state_dict(model, state, strict=False)
    after = _weights(model)
    np.testing.assert_array_equal(after["proj.bias"], before["proj.bias"])
    np.testing.assert_array_equal(after["proj.weight"], state["proj.weight"].numpy().T)


def test_prefix_and_ignored_buffers():
    model = _keras_block()
    state = {"m." + k: v for k, v in _torch_block(3).state_dict().items()}
    state["m.position_ids"] = torch.arange(4)
    state["other.weight"] = torch.zeros(3)
    load_state_dict(model, state, prefix="m.", ignore=("position_ids",))
    np.testing.assert_array_equal(
        _weights(model)["token_embedding.weight"], state["m.token_embedding.weight"].numpy()
    )


def test_unbuilt_model_is_refused_by_name():
    with pytest.raises(ValueError, match="'never_built' must be built"):
        named_variables(keras.Sequential([layers.Dense(2)], name="never_built"))


def test_text_encoder_keys_load_with_or_without_the_text_model_prefix():
    source = CLIPTextEncoder(**TINY_CONFIG)
    source(np.zeros((1, TINY_CONFIG["max_length"]), "int32"))
    rng = np.random.default_rng(4)
    for var in source.weights:
        var.assign(rng.standard_normal(var.shape).astype("float32"))
    bare = export_state_dict(source)
    results = []
    for state in (bare, {"text_model." + k: v for k, v in bare.items()}):
        target = CLIPTextEncoder(**TINY_CONFIG)
        target(np.zeros((1, TINY_CONFIG["max_length"]), "int32"))
        diffusers_io.load_text_encoder(target, state)
        results.append(_weights(target))
    for name, value in _weights(source).items():
        np.testing.assert_array_equal(results[0][name], value)
        np.testing.assert_array_equal(results[1][name], value)


def test_vae_state_dict_with_stray_keys_is_refused_before_loading():
    with pytest.raises(CheckpointError, match="2 unexpected keys: bogus.a, bogus.b"):
        diffusers_io.load_vae(None, None, {"bogus.a": np.zeros(1), "bogus.b": np.zeros(1)})
