"""image_to_image, inpaint and outpaint: parity with diffusers, behaviour on tiny-shapes,
strength 0 and 1, compiled-loop reuse and bad inputs.

Parity: the same tiny random weights as tests/test_pipeline.py (the session's diffusers
pipeline from tests/tiny_components.py, loaded into keras-sd through the diffusers-format
reader), DDIM,
guidance 7.5, 10 steps, and the same noise on both sides: diffusers draws its noise
with `randn_tensor` and encodes with `latent_dist.sample(generator)`, so both are
patched in its pipeline modules to our noise and to the posterior mean (keras-sd's
encoding, `sample_mode="argmax"` in diffusers).
"""

import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import randomize_torch_module  # noqa: E402
from keras_sd.shapes import checker, dataset  # noqa: E402
from test_pipeline import MAX_TOLERANCE, MEAN_TOLERANCE, compare  # noqa: E402
from tiny_components import PROMPT, SIZE, build_ours  # noqa: E402

STEPS = 6
BATCH = 2
LATENT = SIZE // 2  # the tiny VAE halves the image


# ------------------------------------------------------------------ diffusers parity
@pytest.fixture
def reference(tiny_diffusers_pipe, tiny_keras_sd):
    """(diffusers text-to-image pipeline, keras-sd with the same weights)."""
    return tiny_diffusers_pipe, tiny_keras_sd


@pytest.fixture(scope="module")
def inpainting_reference(tiny_diffusers_pipe):
    """The same pipeline with a 9-channel (inpainting) UNet of seeded random weights."""
    from diffusers import UNet2DConditionModel

    pipe = tiny_diffusers_pipe
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
    randomize_torch_module(unet, seed=3, std=0.05)
    components = {**pipe.components, "unet": unet.eval()}
    pipe9 = type(pipe)(**components, requires_safety_checker=False)
    return pipe9, build_ours(pipe9)


def source_image() -> np.ndarray:
    return dataset.render(dataset.Combination("circle", "red", "blue"), size=SIZE)


def parity_noise() -> np.ndarray:
    rng = np.random.RandomState(11)
    return rng.standard_normal((BATCH, LATENT, LATENT, 4)).astype(np.float32)


def parity_mask(soft: bool) -> np.ndarray:
    """[H, W] in [0, 1], constant over each latent cell (2x2 pixels) so that diffusers'
    nearest downsampling and keras-sd's max-pooling give the same latent mask."""
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[16:48, 10:44] = 1.0
    if soft:  # a ramp over the cells of the right half, 0 to 1
        cells = np.arange(SIZE) // 2
        mask[:, 32:] = np.clip((cells[32:] - 15) / 16.0, 0.0, 1.0)
    return mask


def run_diffusers(monkeypatch, pipe_class, pipe, noise, **call):
    """A diffusers image pipeline built from `pipe`'s components, drawing `noise` and
    encoding with the posterior mean; returns uint8 images."""
    import importlib

    module = importlib.import_module(pipe_class.__module__)
    nchw = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(nchw.shape), (shape, nchw.shape)
        return nchw.clone()

    original = module.retrieve_latents
    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    monkeypatch.setattr(
        module,
        "retrieve_latents",
        lambda out, generator=None, sample_mode="sample": original(out, sample_mode="argmax"),
    )
    image_pipe = pipe_class(**pipe.components, requires_safety_checker=False)
    if "mask_image" in call:  # diffusers binarises masks; keep soft values as keras-sd does
        from diffusers.image_processor import VaeImageProcessor

        image_pipe.mask_processor = VaeImageProcessor(
            vae_scale_factor=image_pipe.vae_scale_factor,
            do_normalize=False,
            do_binarize=False,
            do_convert_grayscale=True,
        )
    with torch.no_grad():
        out = image_pipe(
            PROMPT,
            num_images_per_prompt=len(noise),
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            output_type="np",
            **call,
        ).images
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def assert_parity(ours, theirs):
    result = compare(ours, theirs)
    assert result["reference_std"] > 20, result  # informative images, not flat ones
    assert result["mean_abs"] <= MEAN_TOLERANCE and result["max_abs"] <= MAX_TOLERANCE, result


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_image_to_image_matches_diffusers(monkeypatch, reference, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, sd = reference
    image, noise = source_image(), parity_noise()
    theirs = run_diffusers(
        monkeypatch,
        StableDiffusionImg2ImgPipeline,
        pipe,
        noise,
        image=np.stack([image] * BATCH).astype(np.float32) / 255.0,
        strength=strength,
    )
    ours = sd.image_to_image(
        PROMPT,
        image,
        strength=strength,
        batch_size=BATCH,
        num_steps=STEPS,
        diffusion_noise=noise,
        progress=False,
    )
    assert_parity(ours, theirs)


@pytest.mark.parametrize(
    "unet_channels, soft, strength",
    [(9, False, 1.0), (9, True, 1.0), (4, False, 1.0), (4, True, 1.0), (4, False, 0.6)],
)
def test_inpaint_matches_diffusers(
    monkeypatch, reference, inpainting_reference, unet_channels, soft, strength
):
    """9 channels: mask and masked-image latents as UNet inputs; 4 channels: the known
    region re-noised and blended back after every step. Compared before paste-back."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe, sd = inpainting_reference if unet_channels == 9 else reference
    assert sd.diffusion_model.in_channels == unet_channels
    image, noise, mask = source_image(), parity_noise(), parity_mask(soft)
    theirs = run_diffusers(
        monkeypatch,
        StableDiffusionInpaintPipeline,
        pipe,
        noise,
        image=image[None].astype(np.float32) / 255.0,
        mask_image=mask[None, ..., None],
        strength=strength,
        height=SIZE,
        width=SIZE,
    )
    ours = sd.inpaint(
        PROMPT,
        image,
        mask,
        strength=strength,
        batch_size=BATCH,
        num_steps=STEPS,
        diffusion_noise=noise,
        keep_unmasked=False,
        progress=False,
    )
    assert_parity(ours, theirs)


def test_image_to_image_runs_an_inpainting_unet_with_a_full_mask(inpainting_reference):
    _, sd = inpainting_reference
    out = sd.image_to_image(PROMPT, source_image(), strength=0.5, num_steps=2, seed=0)
    assert out.shape == (1, SIZE, SIZE, 3) and out.dtype == np.uint8


# ---------------------------------------------------------------- strength 0 and 1
def test_strength_one_is_text_to_image_from_the_noised_image(reference):
    """Strength 1 runs the whole schedule from the image noised to its first timestep:
    text_to_image from those latents gives the same images."""
    _, sd = reference
    image, noise = source_image(), parity_noise()
    ours = sd.image_to_image(
        PROMPT, image, strength=1.0, batch_size=BATCH, num_steps=STEPS, diffusion_noise=noise
    )
    first = sd.scheduler.schedule(STEPS, 1.0)["timesteps"][0]
    latents = sd.scheduler.add_noise(sd.encode_image(image), noise, np.full(BATCH, first, np.int32))
    expected = sd.text_to_image(
        PROMPT, batch_size=BATCH, num_steps=STEPS, diffusion_noise=latents, progress=False
    )
    np.testing.assert_array_equal(ours, expected)


@pytest.fixture(scope="module")
def tiny_shapes():
    from keras_sd import StableDiffusion

    return StableDiffusion.from_preset("tiny-shapes", jit_compile=False)


@pytest.mark.parametrize("strength", [0.0, 0.01])
def test_strength_zero_returns_the_vae_round_trip(tiny_shapes, strength):
    """No step runs (strength 0, or int(num_steps * strength) == 0): the input's VAE
    round trip, within the trained VAE's reconstruction error of the input."""
    sd = tiny_shapes
    image = source_image()
    out = sd.image_to_image(PROMPT, image, strength=strength, num_steps=50, seed=0)
    np.testing.assert_array_equal(out, sd.decode_latents(sd.encode_image(image)))
    # The tiny VAE's reconstruction error on this render: 7.4 grey levels on average.
    error = np.abs(out[0].astype(int) - image.astype(int))
    assert error.mean() < 10.0, error.mean()
    assert checker.check(out[0], PROMPT).ok


# -------------------------------------------------------- tiny-shapes, read by checker
COUNT = 20  # seeds (jittered renders), run as CALLS calls of COUNT // CALLS images
CALLS = 4
SHAPES_STEPS = 20
RED_CIRCLE = dataset.Combination("circle", "red", "blue")


def jittered_renders(combination, count=COUNT) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([dataset.render(combination, 64, rng) for _ in range(count)])


def in_calls(method, prompt, renders, *args, masks=None, **kwargs) -> np.ndarray:
    """`method` over the renders in CALLS calls of one shape (seeds 0, 1, ...): one trace,
    reused. One call of all 20 is slower on TensorFlow's CPU graphs, whose fused
    GroupNorm unrolls the batch (UNet batch 40 with guidance): 75 s against 27 s for
    4 x 5 images, measured on text_to_image."""
    outputs = []
    for seed, part in enumerate(np.split(np.arange(len(renders)), CALLS)):
        extra = () if masks is None else (masks[part],)
        outputs.append(
            method(prompt, renders[part], *extra, *args, seed=seed, progress=False, **kwargs)
        )
    return np.concatenate(outputs)


def test_image_to_image_changes_the_colour_on_tiny_shapes(tiny_shapes):
    prompt = "a green circle on a blue background"
    renders = jittered_renders(RED_CIRCLE)
    out = in_calls(
        tiny_shapes.image_to_image, prompt, renders, strength=0.75, num_steps=SHAPES_STEPS
    )
    results = [checker.check(image, prompt) for image in out]
    assert sum(r.ok for r in results) >= 0.8 * COUNT, results


def bounding_box_masks(renders: np.ndarray, margin: int = 4) -> np.ndarray:
    """Each render's shape bounding box grown by `margin` pixels, as bool masks."""
    background = np.asarray(dataset.COLORS[RED_CIRCLE.background])
    masks = np.zeros(renders.shape[:3], bool)
    for mask, image in zip(masks, renders, strict=True):
        rows, cols = np.nonzero(np.abs(image.astype(int) - background).sum(-1) > 30)
        mask[
            max(rows.min() - margin, 0) : rows.max() + margin + 1,
            max(cols.min() - margin, 0) : cols.max() + margin + 1,
        ] = True
    return masks


def test_inpaint_repaints_the_box_and_keeps_the_rest_on_tiny_shapes(tiny_shapes):
    prompt = "a yellow square on a blue background"
    renders = jittered_renders(RED_CIRCLE)
    masks = bounding_box_masks(renders)
    out = in_calls(tiny_shapes.inpaint, prompt, renders, masks=masks, num_steps=SHAPES_STEPS)
    results = [checker.check(image, prompt) for image in out]
    assert sum(r.ok for r in results) >= 0.7 * COUNT, results
    np.testing.assert_array_equal(out[~masks], renders[~masks])


def nearest_colour(rgb) -> str:
    return min(dataset.COLORS, key=lambda name: np.sum((np.array(dataset.COLORS[name]) - rgb) ** 2))


def test_outpaint_keeps_the_image_and_paints_background_on_tiny_shapes(tiny_shapes):
    renders = jittered_renders(RED_CIRCLE)
    out = in_calls(
        tiny_shapes.outpaint, RED_CIRCLE.caption, renders, (0, 16, 0, 16), num_steps=SHAPES_STEPS
    )
    assert out.shape == (COUNT, 64, 96, 3)
    np.testing.assert_array_equal(out[:, :, 16:80], renders)
    strips = np.concatenate([out[:, :, :16], out[:, :, 80:]], axis=2).reshape(COUNT, -1, 3)
    colours = [nearest_colour(strip.mean(axis=0)) for strip in strips]
    assert colours.count(RED_CIRCLE.background) >= 0.8 * COUNT, colours


def test_prompt_lists_give_batch_size_images_per_prompt(tiny_shapes):
    """text_to_image and image_to_image: a list of prompts (and of negative prompts)
    gives `batch_size` images per prompt, in prompt order, each following its prompt."""
    prompts = ["a yellow star on a black background", "a green circle on a blue background"]
    run = partial(
        tiny_shapes.text_to_image,
        prompts,
        batch_size=2,
        num_steps=SHAPES_STEPS,
        seed=0,
        progress=False,
    )
    out = run()
    assert out.shape == (4, 64, 64, 3)
    wanted = [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert sum(checker.check(image, p).ok for image, p in zip(out, wanted, strict=True)) >= 3
    # A negative prompt per prompt: the first prompt's images change, the second's ("")
    # are those of the empty default.
    steered = run(negative_prompt=["a yellow star on a black background", ""])
    assert np.abs(steered[:2].astype(int) - out[:2]).mean() > 5
    np.testing.assert_allclose(steered[2:], out[2:], atol=1)
    redrawn = tiny_shapes.image_to_image(
        prompts[1:] + ["a yellow circle on a blue background"],
        source_image(),  # one image serves both prompts
        strength=0.75,
        num_steps=SHAPES_STEPS,
        seed=0,
        progress=False,
    )
    assert redrawn.shape == (2, 64, 64, 3)
    assert [checker.read(image).color for image in redrawn] == ["green", "yellow"]


# --------------------------------------------------------------- compiled-loop reuse
def test_new_prompt_seed_guidance_image_or_mask_does_not_retrace(reference):
    _, sd = reference
    image, other = source_image(), dataset.render(dataset.Combination("star", "white", "black"))
    sd.image_to_image(PROMPT, image, strength=0.5, num_steps=4, seed=1)
    traces = sd.sampler.trace_count
    sd.image_to_image(
        "a blue square",
        other,
        strength=0.5,
        num_steps=4,
        seed=2,
        unconditional_guidance_scale=3.0,
        negative_prompt="a red star",
    )
    assert sd.sampler.trace_count == traces
    sd.inpaint(PROMPT, image, parity_mask(False), num_steps=4, seed=1)
    traces = sd.sampler.trace_count
    sd.inpaint("a blue square", other, parity_mask(True), num_steps=4, seed=3)
    assert sd.sampler.trace_count == traces


def test_new_strength_does_not_retrace(reference):
    _, sd = reference
    sd.image_to_image(PROMPT, source_image(), strength=0.5, num_steps=4, seed=1)
    traces = sd.sampler.trace_count
    sd.image_to_image(PROMPT, source_image(), strength=0.75, num_steps=4, seed=1)
    assert sd.sampler.trace_count == traces


# ---------------------------------------------------------------------- bad inputs
def _mask(shape=(64, 64)):
    mask = np.zeros(shape, np.float32)
    mask[16:48, 16:48] = 1
    return mask


@pytest.mark.parametrize(
    "method, kwargs, error, needle",
    [
        (
            "image_to_image",
            {"image": np.zeros((68, 64, 3), np.uint8)},
            ValueError,
            "image size 68x64 .* not a multiple of 8.* nearest valid size is 64x64",
        ),
        (
            "image_to_image",
            {"image": np.zeros((64, 64, 4), np.uint8)},
            ValueError,
            r"image must be channels-last RGB .*\(RGBA or latents\?\)",
        ),
        (
            "image_to_image",
            {"image": "/no/such/image.png"},
            ValueError,
            "image: cannot read an image from '/no/such/image.png'",
        ),
        (
            "image_to_image",
            {"image": np.zeros((64, 64, 3), np.float32)},
            TypeError,
            "image is a float array: pass value_range",
        ),
        ("image_to_image", {"strength": 1.5}, ValueError, r"strength must be in \[0, 1\]"),
        ("image_to_image", {"strength": -0.1}, ValueError, r"strength must be in \[0, 1\]"),
        ("image_to_image", {"strength": "high"}, TypeError, "strength must be a number"),
        ("image_to_image", {"strength": None}, TypeError, "strength must be a number"),
        (
            "image_to_image",
            {"prompt": ["a", "b", "c"], "image": np.zeros((2, 64, 64, 3), np.uint8)},
            ValueError,
            "prompt 3, image 2",
        ),
        (
            "image_to_image",
            {"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]},
            ValueError,
            "negative_prompt has 3 entries but prompt has 2",
        ),
        ("image_to_image", {"prompt": 7}, TypeError, "prompt must be a string"),
        (
            "image_to_image",
            {"seed": None, "diffusion_noise": np.zeros((1, 8, 8, 4), np.float32)},
            ValueError,
            "diffusion_noise must have shape",
        ),
        (
            "inpaint",
            {"mask": np.zeros((64, 64, 3), np.float32)},
            ValueError,
            "mask must have one channel",
        ),
        (
            "inpaint",
            {"mask": _mask((32, 32))},
            ValueError,
            "mask size 32x32 does not match the image's 64x64",
        ),
        ("inpaint", {"mask": _mask() * 2}, ValueError, r"mask values must be in \[0, 1\]"),
        ("inpaint", {"mask": _mask() - 0.5}, ValueError, r"mask values must be in \[0, 1\]"),
        (
            "inpaint",
            {"image": np.zeros((2, 64, 64, 3), np.uint8), "mask": np.stack([_mask()] * 3)},
            ValueError,
            "image 2, mask 3",
        ),
        ("inpaint", {"mask": "/no/such/mask.png"}, ValueError, "mask: cannot read"),
        ("outpaint", {"extend": (0, -8, 0, 0)}, ValueError, "extend must be"),
        ("outpaint", {"extend": (0, 0, 0, 0)}, ValueError, "extend must grow"),
    ],
)
def test_bad_inputs_name_the_argument(tiny_shapes, method, kwargs, error, needle):
    args = {"prompt": RED_CIRCLE.caption, "image": source_image(), "seed": 0}
    if method == "inpaint":
        args["mask"] = _mask()
    if method == "outpaint":
        args["extend"] = (0, 8, 0, 8)
    args.update(kwargs)
    with pytest.raises(error, match=needle):
        getattr(tiny_shapes, method)(**args, num_steps=2, progress=False)
