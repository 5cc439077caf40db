"""`StableDiffusion`: the user-facing class (text-to-image here; the image workflows
in `keras_sd.workflows`).

Thin by design: validate -> tokenize -> encode -> compiled denoising loop ->
decode -> uint8. The model math lives in `keras_sd.models`, the loop in
`keras_sd.sampling`, the noise schedule in `keras_sd.schedulers`.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops
from tqdm.auto import tqdm

from keras_sd import arguments, backend, presets
from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.sampling import Sampler
from keras_sd.schedulers import build_scheduler, get_scheduler
from keras_sd.textual_inversion import TextualInversionMixin
from keras_sd.tokenizer import CLIPTokenizer
from keras_sd.weights import checkpoint, hub, keras_cv
from keras_sd.workflows import ImageWorkflows


class StableDiffusion(ImageWorkflows, TextualInversionMixin):
    """Stable Diffusion 1.x / 2.x text-to-image in Keras 3.

    The constructor builds the architecture named by `config` with random
    weights and downloads nothing; load weights with `from_preset` or
    `from_checkpoint`, or assign components. KerasCV's signature
    `StableDiffusion(img_height, img_width, jit_compile)` and attribute names
    (`tokenizer`, `text_encoder`, `diffusion_model`, `decoder`, `image_encoder`)
    are kept, so KerasCV code keeps working. Components are read when a method is
    called: assigning one (say `sd.diffusion_model = my_unet`) takes effect on the
    next call, with its own compiled programs.

    Args:
        img_height: default image height in pixels, a multiple of `size_multiple` (64
            for SD 1.x/2.x: the VAE's factor 8, times 2 per UNet downsampling).
        img_width: default image width in pixels, likewise.
        jit_compile: True (XLA), False or "auto" (XLA on GPUs, and on CPUs for
            full-size float32 models; see `keras_sd.backend.resolve_jit_compile`); the
            whole denoising loop is one compiled program either way.
        config: a model configuration name from `keras_sd.presets.MODEL_CONFIGS`
            ("sd1", "sd2", "tiny", ...) or a dict with the keys "tokenizer",
            "text_encoder", "unet", "vae" and "scheduler".
        tokenizer, text_encoder, diffusion_model, decoder, image_encoder: ready
            components used instead of building them from `config`.
        scheduler: a `keras_sd.schedulers.Scheduler`, or a name from
            `keras_sd.schedulers.scheduler_names()` ("ddim", "DDIMScheduler", ...)
            built with the config's scheduler settings.

    Example:
    >>> sd = StableDiffusion(img_height=64, img_width=64, config="tiny")
    >>> images = sd.text_to_image("a red circle", num_steps=2, seed=1)
    >>> images.shape, images.dtype
    ((1, 64, 64, 3), dtype('uint8'))
    """

    def __init__(
        self,
        img_height: int = 512,
        img_width: int = 512,
        jit_compile="auto",
        *,
        config="sd1",
        tokenizer=None,
        text_encoder=None,
        diffusion_model=None,
        decoder=None,
        image_encoder=None,
        scheduler=None,
    ):
        backend.validate_jit_compile(jit_compile)
        self.config = cfg = presets.resolve_model_config(config)
        self.jit_compile = jit_compile
        self.scheduler = self._get_scheduler(scheduler)  # checked before building models
        parts = (tokenizer, text_encoder, diffusion_model, decoder, image_encoder)
        arguments.check_construction(cfg, img_width, img_height, *parts)
        self.img_width, self.img_height = img_width, img_height
        self.tokenizer = tokenizer or CLIPTokenizer(**cfg["tokenizer"])
        self.text_encoder = text_encoder or CLIPTextEncoder(**cfg["text_encoder"])
        self.diffusion_model = diffusion_model or UNet(**cfg["unet"])
        self.decoder = decoder or VAEDecoder(**cfg["vae"])
        self.image_encoder = image_encoder or VAEEncoder(**cfg["vae"])
        # Generation settings a preset recommends (the CLI's defaults).
        self.defaults = {"num_steps": 50, "guidance_scale": 7.5}
        self._compiled = {}  # role -> (component, compiled program), see _program

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_preset(cls, name: str, *, jit_compile="auto", **kwargs):
        """Load a named model: a bundled one (offline) or a hub download (cached).

        Args:
            name: one of `keras_sd.presets.preset_names()`, e.g. "tiny-shapes"
                (bundled), "sd-v1-5", "sd-v2-1".
            jit_compile: see the class.
            **kwargs: `img_width`, `img_height`, `dtype`, and for hub presets the arguments
                of `keras_sd.weights.hub.preset_kwargs` (`cache_dir`, `token`, ...).
                The weights' dtype rule: `dtype=None` follows the global Keras policy,
                except that under "mixed_float16"/"mixed_bfloat16" the variables are
                float16/bfloat16 (inference: half the memory); `dtype="mixed_bfloat16"`
                keeps float32 variables, which training needs.

        Returns:
            An instance of `cls` (subclasses load as themselves).

        Example:
        >>> sd = StableDiffusion.from_preset("tiny-shapes")
        >>> sd.text_to_image("a red circle on a blue background", seed=0).shape[-1]
        3
        >>> StableDiffusion.from_preset("tiny-shapes", dtype="bfloat16").diffusion_model.dtype
        'bfloat16'
        """
        if name in presets.BUNDLED_PRESETS:
            parts = checkpoint.checkpoint_kwargs(presets.bundled_preset_path(name), **kwargs)
        else:
            parts = hub.preset_kwargs(name, **kwargs)
        return cls(jit_compile=jit_compile, **parts)

    @classmethod
    def from_checkpoint(cls, path, *, jit_compile="auto", **kwargs):
        """Load a single-file (.safetensors/.ckpt) checkpoint, a diffusers folder, a
        keras-sd file or KerasCV `.h5` weights.

        Args:
            path: see `keras_sd.weights.checkpoint.checkpoint_kwargs`.
            jit_compile: see the class.
            **kwargs: `config`, `prediction_type`, `img_size`, `img_width`, `img_height`,
                `use_ema`, `dtype` (the rule of `from_preset`) and per-component
                overrides, as documented in `keras_sd.weights.checkpoint.checkpoint_kwargs`.

        Returns:
            An instance of `cls` (subclasses load as themselves).

        Example:
        >>> sd = StableDiffusion.from_checkpoint("v1-5.safetensors")  # doctest: +SKIP
        """
        arguments.check_checkpoint_kwargs(kwargs, presets.COMPONENTS)
        return cls(jit_compile=jit_compile, **checkpoint.checkpoint_kwargs(path, **kwargs))

    @classmethod
    def from_keras_cv(cls, model=None, *, jit_compile="auto", **kwargs):
        """Convert an in-memory `keras_cv.models.StableDiffusion` (or V2) model.

        Args:
            model: the KerasCV model; see `keras_sd.weights.keras_cv.keras_cv_kwargs`
                for the per-component, image-size and `dtype` arguments in `kwargs`.
            jit_compile: see the class.

        Returns:
            An instance of `cls` (subclasses load as themselves).

        Example:
        >>> sd = StableDiffusion.from_keras_cv(keras_cv.models.StableDiffusion())  # doctest: +SKIP
        """
        return cls(jit_compile=jit_compile, **keras_cv.keras_cv_kwargs(model, **kwargs))

    def save_checkpoint(self, path, layout: str = "compvis", dtype: str | None = None) -> None:
        """Save as a CompVis single-file .safetensors, a diffusers folder or a keras-sd file.

        See `keras_sd.weights.checkpoint.save_checkpoint` for the layouts.

        Example:
        >>> sd.save_checkpoint("model.safetensors")  # doctest: +SKIP
        """
        checkpoint.save_checkpoint(self, path, layout=layout, dtype=dtype)

    def _get_scheduler(self, scheduler):
        """A scheduler instance, or the registered one named, with the config's settings."""
        if scheduler is None or isinstance(scheduler, str):
            return build_scheduler(self.config["scheduler"], name=scheduler)
        return get_scheduler(scheduler)

    # ------------------------------------------------------- compiled programs
    def _jit(self) -> bool:
        """`jit_compile` resolved for the current UNet's precision and size."""
        unet = self.diffusion_model
        params = sum(math.prod(v.shape) for v in unet.weights)
        return backend.resolve_jit_compile(self.jit_compile, unet.compute_dtype, params)

    def _program(self, role: str, component, build):
        """The compiled program `build()` made for `component`, rebuilt when the
        attribute holding it has been assigned another object."""
        cached = self._compiled.get(role)
        if cached is None or cached[0] is not component:
            cached = self._compiled[role] = (component, build())
        return cached[1]

    @property
    def sampler(self) -> Sampler:
        """The compiled denoising loop around the current `diffusion_model`."""
        unet = self.diffusion_model
        return self._program("sampler", unet, lambda: Sampler(unet, self._jit()))

    def _stateless_program(self, role: str):
        model = getattr(self, role)
        program = self._program(role, model, lambda: backend.shared_stateless(model, self._jit()))
        return program, backend.model_state(model)

    # ------------------------------------------------------------------ helpers
    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return self.decoder.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: `latent_factor` times the UNet's own
        factor, since its skip connections need latent sides divisible by 2 per
        downsampling (8 for tiny-shapes, 64 for SD 1.x/2.x; diffusers' UNet resizes
        instead and takes multiples of 8)."""
        return self.latent_factor * 2 ** (len(self.diffusion_model.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.decoder.latent_channels

    # -------------------------------------------------------------- public API
    def encode_text(self, prompt):
        """Encode prompts into text embeddings.

        Args:
            prompt: a string or a list of strings; longer than the tokenizer's
                maximum length (77 tokens) they are truncated, as diffusers does.

        Returns:
            A float tensor [N, 77, D] (N prompts; D = 768 for SD 1.x, 1024 for SD 2.x).

        Example:
        >>> sd = StableDiffusion(64, 64, config="tiny")
        >>> tuple(sd.encode_text("a red circle").shape)[:2]
        (1, 77)
        """
        token_ids = self.tokenizer(arguments.prompt_list(prompt, "prompt"))
        table = getattr(self.text_encoder, "vocab_size", None)
        if table is not None and int(np.max(token_ids)) >= table:
            raise ValueError(
                f"prompt uses token id {int(np.max(token_ids))} but the text encoder has "
                f"{table} token embeddings: the tokenizer has added tokens the text "
                "encoder's embedding table does not hold; grow the table for them "
                "(load or train their embeddings) before using them."
            )
        program, weights = self._stateless_program("text_encoder")
        with backend.no_grad():
            return program(weights, ops.convert_to_tensor(token_ids, "int32"))

    def generate_image(
        self,
        encoded_text,
        negative_prompt=None,
        batch_size: int = 1,
        num_steps: int = 50,
        unconditional_guidance_scale: float = 7.5,
        diffusion_noise=None,
        seed: int | None = None,
        *,
        scheduler=None,
        width: int | None = None,
        height: int | None = None,
        progress: bool = True,
    ) -> np.ndarray:
        """Generate images from text embeddings (the KerasCV lower-level API).

        Args:
            encoded_text: output of `encode_text`, [1, L, D] (repeated to
                `batch_size`) or [batch_size, L, D].
            negative_prompt: text to steer away from, one string or one per image;
                None uses the empty prompt.
            batch_size: number of images.
            num_steps: denoising steps.
            unconditional_guidance_scale: classifier-free guidance weight; 1 turns
                guidance off (one UNet half per step instead of two).
            diffusion_noise: starting latents [B, h, w, C] or [h, w, C]; exclusive
                with `seed`.
            seed: seed of the starting noise (numpy, so it is the same on every
                backend); None draws a fresh one.
            scheduler: overrides `self.scheduler` for this call: a scheduler or a
                registered name (built with the model config's settings).
            width, height: override the constructor's image size for this call.
            progress: show a progress bar over the denoising steps.

        Returns:
            np.uint8 array [batch_size, height, width, 3].

        Raises:
            ValueError, TypeError: a bad argument, named, before any model runs
                (including a run whose estimated memory exceeds the machine's).
            FloatingPointError: the result holds NaN/inf (float16 overflow, bad
                weights or inputs) instead of an image.

        Example:
        >>> sd = StableDiffusion(64, 64, config="tiny")
        >>> sd.generate_image(sd.encode_text("a red circle"), num_steps=2, seed=0).shape
        (1, 64, 64, 3)
        """
        scheduler, width, height = arguments.check_run(
            self, batch_size, num_steps, unconditional_guidance_scale, seed, scheduler=scheduler,
            width=width, height=height, diffusion_noise=diffusion_noise, progress=progress
        )  # fmt: skip
        negatives = arguments.negative_list(negative_prompt, batch_size)
        guided = unconditional_guidance_scale > 1.0
        context = arguments.text_context(encoded_text, batch_size, self, guided)
        uncond = None
        if guided:
            uncond = self.encode_text(negatives)
            uncond = arguments.expand_batch(uncond, batch_size, "negative_prompt")
        latent_shape = (
            batch_size,
            height // self.latent_factor,
            width // self.latent_factor,
            self.latent_channels,
        )
        latents = arguments.noise_like(latent_shape, seed, diffusion_noise)
        if diffusion_noise is None:
            latents *= scheduler.init_noise_sigma
        latents = self._denoise(
            scheduler,
            latents,
            context,
            uncond,
            guidance=unconditional_guidance_scale,
            num_steps=num_steps,
            seed=seed,
            progress=progress,
        )
        return self.decode_latents(latents)

    def _denoise(
        self,
        scheduler,
        latents,
        context,
        uncond,
        *,
        guidance,
        num_steps,
        seed,
        progress,
        strength=1.0,
        **inpaint,
    ) -> np.ndarray:
        """Run the compiled loop from `latents`; the final latents as numpy. `inpaint`:
        the sampler's mask / masked_image_latents / image_latents / blend_noise."""
        step_noise = None
        if scheduler.needs_step_noise:
            rng = np.random.default_rng(None if seed is None else seed + 1)
            step_noise = rng.standard_normal((num_steps, *latents.shape), dtype=np.float32)
        steps = int(num_steps * strength)
        with tqdm(total=steps, desc="denoising", disable=not progress, leave=False) as bar:
            latents = self.sampler(
                scheduler,
                latents,
                context,
                uncond,
                guidance_scale=float(guidance),
                num_steps=num_steps,
                strength=strength,
                step_noise=step_noise,
                callback=(lambda _: bar.update(1)) if progress else None,
                **inpaint,
            )
            latents = ops.convert_to_numpy(latents)
            bar.update(bar.total - bar.n)  # programs that cannot report per step
        return arguments.check_finite(latents, "denoised latents", self.diffusion_model)

    def decode_latents(self, latents) -> np.ndarray:
        """Decode latents to uint8 images [B, H, W, 3] (applies the VAE scaling factor)."""
        scaled = ops.cast(latents, "float32") / self.decoder.scaling_factor
        program, weights = self._stateless_program("decoder")
        with backend.no_grad():
            pixels = program(weights, scaled)
        pixels = np.asarray(ops.convert_to_numpy(ops.cast(pixels, "float32")))
        arguments.check_finite(pixels, "decoded pixels", self.decoder)
        return np.round(np.clip((pixels + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)

    def text_to_image(
        self,
        prompt,
        negative_prompt=None,
        batch_size: int = 1,
        num_steps: int = 50,
        unconditional_guidance_scale: float = 7.5,
        seed: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Generate images from a prompt, or from a list of prompts.

        Args:
            prompt: the text to draw, or a list of texts (as diffusers: each prompt
                gets `batch_size` images, in prompt order).
            negative_prompt: text to steer away from (None: the empty prompt), or a
                list with one entry per prompt.
            batch_size: images per prompt.
            num_steps: denoising steps (DDIM by default).
            unconditional_guidance_scale: classifier-free guidance weight (7.5).
            seed: seed for the starting noise; the same seed gives the same
                images on every backend.
            **kwargs: `scheduler`, `width`, `height`, `diffusion_noise` (for all
                `len(prompts) * batch_size` images), `progress`, passed to
                `generate_image`.

        Returns:
            np.uint8 array [len(prompts) * batch_size, height, width, 3].

        Raises:
            ValueError, TypeError, FloatingPointError: as `generate_image`.

        Example:
        >>> sd = StableDiffusion(64, 64, config="tiny")
        >>> sd.text_to_image("a red circle", batch_size=2, num_steps=2, seed=3).shape
        (2, 64, 64, 3)
        >>> sd.text_to_image(["a red circle", "a blue square"], num_steps=2, seed=3).shape
        (2, 64, 64, 3)
        """
        prompts = arguments.prompt_list(prompt, "prompt")
        negatives = arguments.negative_list(negative_prompt, len(prompts))
        guidance, steps = unconditional_guidance_scale, num_steps
        arguments.check_run(self, batch_size, steps, guidance, seed, len(prompts), **kwargs)
        context, negative_rows = self._text_rows(prompts, negatives, len(prompts), batch_size)
        return self.generate_image(
            context,
            negative_prompt=negative_rows,
            batch_size=len(prompts) * batch_size,
            num_steps=num_steps,
            unconditional_guidance_scale=unconditional_guidance_scale,
            seed=seed,
            **kwargs,
        )

    def _text_rows(self, prompts, negatives, items: int, batch_size: int):
        """(context [items * batch_size, L, D], negative prompt per row): `items` outputs
        of `batch_size` images each; one prompt (or negative) serves every item."""
        rows = arguments.rows(len(prompts), items, batch_size)
        context = ops.take(self.encode_text(prompts), ops.convert_to_tensor(rows), axis=0)
        negative_rows = [negatives[i] for i in arguments.rows(len(negatives), items, batch_size)]
        return context, negative_rows
