"""CompVis <-> diffusers key maps, checked against diffusers' own single-file converters."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as reference  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from conftest import randomize_torch_module, torch_state_dict  # noqa: E402
from keras_sd.weights.compvis import (  # noqa: E402
    compvis_to_diffusers,
    detect_variant,
    diffusers_to_compvis,
)
from tiny_components import COMPVIS_TEXT as TINY_CLIP  # noqa: E402
from tiny_components import COMPVIS_UNET as TINY_UNET  # noqa: E402
from tiny_components import COMPVIS_VAE as TINY_VAE  # noqa: E402
from tiny_components import FULL_TEXT, FULL_UNET  # noqa: E402
from tiny_components import FULL_VAE as SD_VAE  # noqa: E402

OPENCLIP = "cond_stage_model.model."
SD15_UNET, SD21_UNET = FULL_UNET["sd1"], FULL_UNET["sd2"]
SD15_CLIP, SD21_CLIP = FULL_TEXT["sd1"], FULL_TEXT["sd2"]


def _text_state_dict(model):
    # transformers >= 5 drops the `text_model.` prefix in memory; files (and we) keep it.
    return {"text_model." + k: v for k, v in torch_state_dict(model).items()}


def _openclip_layout(text_sd: dict, layers: int, projection_dim: int, seed: int) -> dict:
    """Write a transformers CLIP text state dict in OpenCLIP's layout (fused q/k/v)."""
    t = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    out = {
        "positional_embedding": t["embeddings.position_embedding.weight"],
        "token_embedding.weight": t["embeddings.token_embedding.weight"],
        "ln_final.weight": t["final_layer_norm.weight"],
        "ln_final.bias": t["final_layer_norm.bias"],
        "text_projection": np.random.default_rng(seed).normal(
            size=(t["final_layer_norm.weight"].shape[0], projection_dim)
        ),
        "logit_scale": np.array(4.6, dtype=np.float32),
    }
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[dst + f"attn.in_proj_{param}"] = np.concatenate(
                [t[src + f"self_attn.{p}_proj.{param}"] for p in "qkv"]
            )
            for ours, theirs in [
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ]:
                out[dst + f"{ours}.{param}"] = t[src + f"{theirs}.{param}"]
    return {OPENCLIP + k: v for k, v in out.items()}


def _build(version: str, in_channels: int = 4, seed: int = 0):
    """Random tiny models -> (torch models, diffusers-layout components, CompVis text dict)."""
    unet = UNet2DConditionModel(
        in_channels=in_channels, use_linear_projection=version == "sd2", **TINY_UNET
    )
    vae = AutoencoderKL(**TINY_VAE)
    layers = 24 if version == "sd2" else 2
    act = "gelu" if version == "sd2" else "quick_gelu"
    text = CLIPTextModel(CLIPTextConfig(num_hidden_layers=layers, hidden_act=act, **TINY_CLIP))
    for n, module in enumerate((unet, vae, text)):
        randomize_torch_module(module, seed=seed + n)
    text_sd = _text_state_dict(text)
    components = {"unet": torch_state_dict(unet), "vae": torch_state_dict(vae)}
    if version == "sd1":
        components["text_encoder"] = text_sd
        compvis_text = {"cond_stage_model.transformer." + k: v for k, v in text_sd.items()}
    else:  # the diffusers SD 2.x text encoder stops one layer before OpenCLIP's last
        components["text_encoder"] = {k: v for k, v in text_sd.items() if ".layers.23." not in k}
        compvis_text = _openclip_layout(text_sd, layers, projection_dim=6, seed=seed)
    return (unet, vae, text), components, compvis_text


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request):
    models, components, compvis_text = _build(request.param)
    flat = diffusers_to_compvis({"unet": components["unet"], "vae": components["vae"]})
    flat.update(compvis_text)
    return request.param, models, components, flat


def _to_torch(state_dict):
    return {k: torch.tensor(np.array(v)) for k, v in state_dict.items()}


def _assert_identical(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        a = actual[key].numpy() if torch.is_tensor(actual[key]) else np.asarray(actual[key])
        e = value.numpy() if torch.is_tensor(value) else np.asarray(value)
        assert a.dtype == e.dtype and a.shape == e.shape, (key, a.shape, e.shape)
        assert np.array_equal(a, e), key


def _strict(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def test_diffusers_round_trip_is_lossless(case):
    version, _, components, _ = case
    back = _strict(compvis_to_diffusers, diffusers_to_compvis(components, version))
    assert back.pop("unused") == {}
    for name in ("unet", "vae", "text_encoder"):
        _assert_identical(back[name], components[name])


def test_matches_diffusers_single_file_converters(case):
    version, (unet, vae, text), components, flat = case
    ours = _strict(compvis_to_diffusers, flat)
    checkpoint = _to_torch(flat)

    theirs_unet = reference.convert_ldm_unet_checkpoint(checkpoint, unet.config)
    theirs_vae = reference.convert_ldm_vae_checkpoint(checkpoint, vae.config)
    if version == "sd1":
        theirs_text = reference.convert_ldm_clip_checkpoint(checkpoint)
    else:
        theirs_text = reference.convert_open_clip_checkpoint(text, checkpoint)

    for name, theirs in [("unet", theirs_unet), ("vae", theirs_vae), ("text_encoder", theirs_text)]:
        _assert_identical(ours[name], theirs)
        # diffusers recovers the original model from our CompVis dict: the reverse map is right.
        _assert_identical(theirs, components[name])
    if version == "sd2":
        unused = sorted(ours["unused"])
        assert unused[:2] == [OPENCLIP + "logit_scale", OPENCLIP + "text_projection"]
        assert all(".resblocks.23." in k for k in unused[2:]) and len(unused) == 14
        assert ours["vae"]["encoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)
        assert flat["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)


def _ema_copy(flat: dict, shift: float) -> dict:
    """LitEma's flattened names (`model_ema.diffusion_modelout2bias`) for the UNet weights."""
    return {
        "model_ema." + "".join(k.split(".")[1:]): v + shift
        for k, v in flat.items()
        if k.startswith("model.diffusion_model.")
    }


def test_compvis_round_trip_keeps_everything(case):
    version, _, _, flat = case
    extra = {
        **_ema_copy(flat, 0.0),
        "model_ema.decay": np.array(0.9999),
        "alphas_cumprod": np.linspace(1, 0, 10),
        "first_stage_model.loss.logvar": np.zeros(()),
    }
    original = {**flat, **extra}
    parts = _strict(compvis_to_diffusers, original)
    assert set(extra) <= set(parts["unused"])
    _assert_identical(diffusers_to_compvis(parts, version), original)


def test_use_ema_takes_the_ema_copy(case):
    version, (unet, *_), _, flat = case
    checkpoint = {**flat, **_ema_copy(flat, 1.0), "model_ema.num_updates": np.array(7)}
    ours = _strict(compvis_to_diffusers, checkpoint, use_ema=True)
    theirs = reference.convert_ldm_unet_checkpoint(
        _to_torch(checkpoint), unet.config, extract_ema=True
    )
    _assert_identical(ours["unet"], theirs)
    plain = compvis_to_diffusers(checkpoint)["unet"]
    assert np.array_equal(ours["unet"]["conv_in.weight"], plain["conv_in.weight"] + 1)
    assert "model_ema.num_updates" in ours["unused"]
    assert not any(k.startswith("model_ema.diffusion_model") for k in ours["unused"])
    with pytest.raises(ValueError, match="no EMA copy"):
        compvis_to_diffusers(flat, use_ema=True)


def test_unknown_keys_are_reported(case):
    version, _, components, flat = case
    odd = {
        "model.diffusion_model.input_blocks.1.0.mystery.weight": np.ones(2),
        "first_stage_model.encoder.sideways.weight": np.ones(2),
        "controlnet.zero_conv.weight": np.ones(2),
    }
    with pytest.warns(UserWarning, match="3 checkpoint keys") as record:
        parts = compvis_to_diffusers({**flat, **odd, "betas": np.ones(3)})
    assert all(k in str(record[0].message) for k in odd)
    assert set(odd) | {"betas"} <= set(parts["unused"])

    with pytest.raises(ValueError, match="unet keys have no CompVis equivalent: foo.weight"):
        diffusers_to_compvis({"unet": {**components["unet"], "foo.weight": np.ones(1)}})
    with pytest.raises(ValueError, match="text_encoder_layout"):
        diffusers_to_compvis(components, "sdxl")
    with pytest.raises(ValueError, match="unknown components"):
        diffusers_to_compvis({"unet": components["unet"], "refiner": {}})


def test_detect_variant(case):
    version, _, _, flat = case
    expected = {
        "version": version,
        "unet_in_channels": 4,
        "has_ema": False,
        "dtype": "float32",
        "context_dim": TINY_UNET["cross_attention_dim"],
        "linear_projection": version == "sd2",
    }
    assert detect_variant(flat) == expected
    unet_only = {k: v for k, v in flat.items() if k.startswith("model.diffusion_model.")}
    assert detect_variant(unet_only) == expected
    ema = {"model_ema.diffusion_modelconv_inweight": np.zeros(1)}
    assert detect_variant({**flat, **ema})["has_ema"]
    with pytest.raises(ValueError, match="not a CompVis Stable Diffusion checkpoint"):
        detect_variant({k: v for k, v in flat.items() if "diffusion_model" not in k})


def test_detect_variant_inpainting_half():
    _, components, _ = _build("sd1", in_channels=9, seed=3)
    half = {
        name: {k: v.astype(np.float16) for k, v in sd.items()} for name, sd in components.items()
    }
    flat = diffusers_to_compvis(half)
    variant = detect_variant(_to_torch(flat))
    assert (variant["unet_in_channels"], variant["dtype"]) == (9, "float16")
    _assert_identical(_strict(compvis_to_diffusers, flat)["unet"], half["unet"])


def _meta_components(version: str):
    """Full-size models on the meta device: keys and shapes without weights."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15_UNET if version == "sd1" else SD21_UNET))
        vae = AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(**(SD15_CLIP if version == "sd1" else SD21_CLIP)))
    zeros = {}
    for name, module in [("unet", unet), ("vae", vae), ("text_encoder", text)]:
        prefix = "text_model." if name == "text_encoder" else ""
        # Zero-stride views: full shapes at no memory cost.
        zeros[name] = {
            prefix + k: np.broadcast_to(np.float32(0), v.shape)
            for k, v in module.state_dict().items()
            if version == "sd1" or ".layers.23." not in k
        }
    return (unet, vae, text), zeros


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_full_size_layouts(version):
    (unet, vae, text), components = _meta_components(version)
    flat = diffusers_to_compvis(components, version)
    expected_shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    }
    if version == "sd1":
        expected_shapes["model.diffusion_model.middle_block.1.proj_in.weight"] = (1280, 1280, 1, 1)
        expected_shapes["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = (768,)
        assert len(flat) == 686 + 248 + 196  # SD 1.5: UNet, VAE, CLIP-L weights
    else:
        expected_shapes["model.diffusion_model.middle_block.1.proj_in.weight"] = (1280, 1280)
        expected_shapes[OPENCLIP + "transformer.resblocks.22.attn.in_proj_weight"] = (3072, 1024)
        assert not any(".resblocks.23." in k for k in flat)
    assert {k: _shapes(flat)[k] for k in expected_shapes} == expected_shapes

    back = _strict(compvis_to_diffusers, flat)
    for name in ("unet", "vae", "text_encoder"):
        assert _shapes(back[name]) == _shapes(components[name]), name

    if version == "sd2":  # diffusers' converter expects the whole 24-block OpenCLIP tower
        full_text = {"text_model." + k: v for k, v in text.state_dict().items()}
        full_text = {k: np.zeros(v.shape, np.float32) for k, v in full_text.items()}
        flat = {k: v for k, v in flat.items() if not k.startswith(OPENCLIP)}
        flat.update(_openclip_layout(full_text, 24, projection_dim=1024, seed=0))
    checkpoint = {k: torch.empty(v.shape, device="meta") for k, v in flat.items()}
    ours = _strict(compvis_to_diffusers, flat)
    theirs = {
        "unet": reference.convert_ldm_unet_checkpoint(checkpoint, unet.config),
        "vae": reference.convert_ldm_vae_checkpoint(checkpoint, vae.config),
        "text_encoder": reference.convert_ldm_clip_checkpoint(checkpoint)
        if version == "sd1"
        else reference.convert_open_clip_checkpoint(text, checkpoint),
    }
    for name in ("unet", "vae", "text_encoder"):
        assert _shapes(ours[name]) == _shapes(theirs[name]), name
