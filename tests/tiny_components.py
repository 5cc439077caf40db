"""Tiny reference components shared by the parity tests, like diffusers' dummy components.

The diffusers/transformers configs of the tiny reference models live here once: the
pipeline parity set (text-to-image and the image workflows against diffusers' own
pipelines), the checkpoint and diffusers-folder set (the same block family), the CompVis
key-map set, and the full-size SD 1.x / SD 2.x layouts. The session-scoped fixtures
build the diffusers pipeline with seeded random weights once per test process, the
keras-sd pipeline converted from it, and the diffusers reference images once per
configuration. They are made available to every test module by the block at the end
of tests/conftest.py.
"""

import numpy as np
import pytest

SIZE = 64  # pixels; the tiny VAE halves them
PROMPT = "a red circle on a blue background"
NEGATIVE = "a green square"
STEPS = 10
GUIDANCE = 7.5

# --------------------------------------------------- diffusers / transformers configs
# One block family for the pipeline, checkpoint and diffusers-folder references.
UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
VAE = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
)
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
# The scheduler settings of the released SD 1.x checkpoints.
DDIM = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

# Channels given explicitly: a config's defaults are not overridable through from_config.
PIPELINE_UNET = {**UNET, "sample_size": SIZE // 2, "in_channels": 4, "out_channels": 4}
PIPELINE_VAE = {**VAE, "in_channels": 3, "out_channels": 3, "latent_channels": 4}
# keras-sd's "tiny" preset has two layers per block and two heads; the checkpoint
# references match it so that `config="tiny"` reads their files.
FOLDER_UNET = {**UNET, "sample_size": 8, "attention_head_dim": 2}
CHECKPOINT_UNET = {**FOLDER_UNET, "layers_per_block": 2}
CHECKPOINT_VAE = {**VAE, "sample_size": 32}

# A smaller three-level family for the CompVis key maps (no forward passes there).
COMPVIS_UNET = dict(
    sample_size=8,
    out_channels=4,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12,
    attention_head_dim=2,
    norm_num_groups=4,
)
COMPVIS_VAE = dict(
    block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
COMPVIS_TEXT = dict(
    hidden_size=8,
    intermediate_size=16,
    num_attention_heads=2,
    vocab_size=50,
    max_position_embeddings=7,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

# Full-size layouts of the released SD 1.5 and SD 2.1 files (key sets and shapes).
FULL_UNET = {
    "sd1": dict(cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
    ),
}
FULL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
)
FULL_TEXT = {
    "sd1": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),
    "sd2": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,  # OpenCLIP ViT-H; SD 2.x uses the first 23
        num_attention_heads=16,
        hidden_act="gelu",
    ),
}


# ------------------------------------------------------------- builders and helpers
def build_reference(vocab_folder):
    """A diffusers StableDiffusionPipeline with the tiny random pipeline components, DDIM
    and the real CLIP vocabulary (written to `vocab_folder`)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    # conftest imports this module's fixtures, so its helpers are imported on use.
    from conftest import randomize_torch_module
    from keras_sd.tokenizer import CLIPTokenizer

    unet = UNet2DConditionModel(**PIPELINE_UNET)
    vae = AutoencoderKL(**PIPELINE_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    # std chosen so the decoded images spread over the grey levels instead of clipping.
    for seed, (module, std) in enumerate(((unet, 0.05), (vae, 0.05), (text_encoder, 0.1))):
        randomize_torch_module(module, seed=seed, std=std)
    CLIPTokenizer().save_vocabulary(vocab_folder)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=HFTokenizer.from_pretrained(str(vocab_folder), model_max_length=77),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**DDIM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_ours(pipe, **kwargs):
    """A keras-sd StableDiffusion with a diffusers pipeline's configs and weights."""
    from conftest import torch_state_dict
    from keras_sd import StableDiffusion
    from keras_sd.models import clip_text, unet, vae
    from keras_sd.schedulers import ddim
    from keras_sd.weights.diffusers import load_components

    config = {
        "tokenizer": {},
        "text_encoder": clip_text.config_from_transformers(pipe.text_encoder.config.to_dict()),
        "unet": unet.config_from_diffusers(dict(pipe.unet.config)),
        "vae": vae.config_from_diffusers(dict(pipe.vae.config)),
        "scheduler": ddim.config_from_diffusers(dict(pipe.scheduler.config)),
    }
    sd = StableDiffusion(SIZE, SIZE, config=config, **kwargs)
    load_components(
        sd,
        unet=torch_state_dict(pipe.unet),
        vae=torch_state_dict(pipe.vae),
        text_encoder=torch_state_dict(pipe.text_encoder),
    )
    return sd


def initial_latents(batch=2):
    return (
        np.random.RandomState(7)
        .standard_normal((batch, SIZE // 2, SIZE // 2, 4))
        .astype(np.float32)
    )


def reference_images(pipe, latents, negative_prompt=None, guidance=GUIDANCE):
    """diffusers' text-to-image from `latents`, STEPS DDIM steps, as uint8."""
    import torch

    with torch.no_grad():
        out = pipe(
            PROMPT,
            negative_prompt=negative_prompt,
            num_images_per_prompt=latents.shape[0],
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        ).images
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


# ------------------------------------------------------------------ session fixtures
@pytest.fixture(scope="session")
def tiny_diffusers_pipe(tmp_path_factory):
    """The diffusers reference pipeline (`build_reference`), built once a session."""
    return build_reference(tmp_path_factory.mktemp("tiny-vocab"))


@pytest.fixture(scope="session")
def tiny_keras_sd(tiny_diffusers_pipe):
    """keras-sd converted from `tiny_diffusers_pipe`, not compiled with XLA; shared, so
    tests must not change its components."""
    return build_ours(tiny_diffusers_pipe)


@pytest.fixture(scope="session")
def tiny_reference_images(tiny_diffusers_pipe):
    """`(negative_prompt, guidance) -> uint8 images` of diffusers from `initial_latents()`,
    each configuration run once a session."""
    cache = {}

    def images(negative_prompt=None, guidance=GUIDANCE):
        key = (negative_prompt, guidance)
        if key not in cache:
            cache[key] = reference_images(
                tiny_diffusers_pipe, initial_latents(), negative_prompt, guidance
            )
        return cache[key].copy()

    return images
