"""`StableDiffusion`: the user-facing text-to-image class.

Thin by design: validate -> tokenize -> encode -> compiled denoising loop ->
decode -> uint8. The model math lives in `keras_sd.models`, the loop in
`keras_sd.sampling`, the noise schedule in `keras_sd.schedulers`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from keras import ops
from tqdm.auto import tqdm

from keras_sd import backend, images, presets
from keras_sd.models.clip_text import CLIPTextEncoder
from keras_sd.models.unet import UNet
from keras_sd.models.vae import VAEDecoder, VAEEncoder
from keras_sd.sampling import Sampler
from keras_sd.schedulers import DDIMScheduler
from keras_sd.tokenizer import CLIPTokenizer


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x text-to-image in Keras 3.

    The constructor builds the architecture named by `config` with random
    weights and downloads nothing; load weights with `from_preset` or
    `from_checkpoint`, or assign components. The KerasCV signature
    `StableDiffusion(img_width, img_height, jit_compile)` and attribute names
    (`tokenizer`, `text_encoder`, `diffusion_model`, `decoder`, `image_encoder`)
    are kept, so KerasCV code keeps working.

    Args:
        img_width: default image width in pixels, a multiple of the VAE factor (8).
        img_height: default image height in pixels, likewise.
        jit_compile: True (XLA), False or "auto" (XLA on GPUs, and on CPUs for
            full-size float32 models; see `keras_sd.backend.resolve_jit_compile`); the
            whole denoising loop is one compiled program either way.
        config: a model configuration name from `keras_sd.presets.MODEL_CONFIGS`
            ("sd1", "sd2", "tiny", ...) or a dict with the keys "tokenizer",
            "text_encoder", "unet", "vae" and "scheduler".
        tokenizer, text_encoder, diffusion_model, decoder, image_encoder, scheduler:
            ready components used instead of building them from `config`.

    Example:
    >>> sd = StableDiffusion(img_width=64, img_height=64, config="tiny")
    >>> images = sd.text_to_image("a red circle", num_steps=2, seed=1)
    >>> images.shape, images.dtype
    ((1, 64, 64, 3), dtype('uint8'))
    """

    def __init__(
        self,
        img_width: int = 512,
        img_height: int = 512,
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
        self.config = presets.resolve_model_config(config)
        self.jit_compile = jit_compile
        cfg = self.config
        self.tokenizer = tokenizer or CLIPTokenizer(**cfg["tokenizer"])
        self.text_encoder = text_encoder or CLIPTextEncoder(**cfg["text_encoder"])
        self.diffusion_model = diffusion_model or UNet(**cfg["unet"])
        self.decoder = decoder or VAEDecoder(**cfg["vae"])
        self.image_encoder = image_encoder or VAEEncoder(**cfg["vae"])
        self.scheduler = scheduler or DDIMScheduler(**cfg["scheduler"])
        self._validate_size("img_width", img_width)
        self._validate_size("img_height", img_height)
        self.img_width, self.img_height = img_width, img_height
        # Generation settings a preset recommends (the CLI's defaults).
        self.defaults = {"num_steps": 50, "guidance_scale": 7.5}
        # "auto" decided once, by device and by the UNet's precision and size.
        unet_params = sum(math.prod(v.shape) for v in self.diffusion_model.weights)
        unet_dtype = self.diffusion_model.compute_dtype
        jit = backend.resolve_jit_compile(jit_compile, unet_dtype, unet_params)
        self.sampler = Sampler(self.diffusion_model, jit)
        self._encode_fn = backend.compile_function(backend.stateless(self.text_encoder), jit)
        self._decode_fn = backend.compile_function(backend.stateless(self.decoder), jit)

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_preset(cls, name: str, **kwargs) -> StableDiffusion:
        """Load a named model: a bundled one (offline) or a hub download (cached).

        Args:
            name: one of `keras_sd.presets.preset_names()`, e.g. "tiny-shapes"
                (bundled), "sd-v1-5", "sd-v2-1".
            **kwargs: `img_width`, `img_height`, `jit_compile`, ...

        Example:
        >>> sd = StableDiffusion.from_preset("tiny-shapes")
        >>> sd.text_to_image("a red circle on a blue background", seed=0).shape[-1]
        3
        """
        if name in presets.BUNDLED_PRESETS:
            from keras_sd.weights.bundle import load_bundle

            return load_bundle(presets.bundled_preset_path(name), **kwargs)
        from keras_sd.weights.hub import load_preset

        return load_preset(name, **kwargs)

    @classmethod
    def from_checkpoint(cls, path, **kwargs) -> StableDiffusion:
        """Load a single-file (.safetensors/.ckpt) checkpoint or a diffusers folder.

        See `keras_sd.weights.checkpoint.load_checkpoint` for the overrides.

        Example:
        >>> sd = StableDiffusion.from_checkpoint("v1-5.safetensors")  # doctest: +SKIP
        """
        from keras_sd.weights.checkpoint import load_checkpoint

        return load_checkpoint(path, **kwargs)

    @classmethod
    def from_keras_cv(cls, model, **kwargs) -> StableDiffusion:
        """Convert an in-memory `keras_cv.models.StableDiffusion` (or V2) model.

        Example:
        >>> sd = StableDiffusion.from_keras_cv(keras_cv.models.StableDiffusion())  # doctest: +SKIP
        """
        from keras_sd.weights.keras_cv import from_keras_cv

        return from_keras_cv(model, **kwargs)

    def save_checkpoint(self, path, layout: str = "compvis") -> None:
        """Save as a CompVis single-file .safetensors or a diffusers folder.

        Example:
        >>> sd.save_checkpoint("model.safetensors")  # doctest: +SKIP
        """
        from keras_sd.weights.checkpoint import save_checkpoint

        save_checkpoint(self, path, layout=layout)

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

    def _validate_size(self, name: str, value) -> None:
        factor = self.latent_factor
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int; received {value!r}.")
        if value <= 0 or value % factor:
            nearest = max(factor, round(value / factor) * factor)
            raise ValueError(
                f"{name} must be a positive multiple of {factor} (the VAE downsampling "
                f"factor); received {value}. Nearest valid: {nearest}."
            )

    def _tokenize(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings; received {prompts!r}.")
        return self.tokenizer(list(prompts))

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
        tokens = ops.convert_to_tensor(self._tokenize(prompt), "int32")
        with backend.no_grad():
            return self._encode_fn(backend.model_state(self.text_encoder), tokens)

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
            scheduler: overrides `self.scheduler` for this call.
            width, height: override the constructor's image size for this call.
            progress: show a progress bar over the denoising steps.

        Returns:
            np.uint8 array [batch_size, height, width, 3].

        Example:
        >>> sd = StableDiffusion(64, 64, config="tiny")
        >>> sd.generate_image(sd.encode_text("a red circle"), num_steps=2, seed=0).shape
        (1, 64, 64, 3)
        """
        width = self.img_width if width is None else width
        height = self.img_height if height is None else height
        self._validate_size("width", width)
        self._validate_size("height", height)
        _check_sampling_args(
            batch_size, num_steps, unconditional_guidance_scale, seed, diffusion_noise
        )
        scheduler = scheduler or self.scheduler
        context = _expand_batch(encoded_text, batch_size, "encoded_text")
        uncond = None
        if unconditional_guidance_scale > 1.0:
            uncond = _expand_batch(
                self.encode_text(negative_prompt or ""), batch_size, "negative_prompt"
            )
        latent_shape = (
            batch_size,
            height // self.latent_factor,
            width // self.latent_factor,
            self.latent_channels,
        )
        latents = _noise(latent_shape, seed, diffusion_noise)
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
        return latents

    def decode_latents(self, latents) -> np.ndarray:
        """Decode latents to uint8 images [B, H, W, 3] (applies the VAE scaling factor)."""
        scaled = ops.cast(latents, "float32") / self.decoder.scaling_factor
        with backend.no_grad():
            pixels = self._decode_fn(backend.model_state(self.decoder), scaled)
        pixels = np.asarray(ops.convert_to_numpy(ops.cast(pixels, "float32")))
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

        Example:
        >>> sd = StableDiffusion(64, 64, config="tiny")
        >>> sd.text_to_image("a red circle", batch_size=2, num_steps=2, seed=3).shape
        (2, 64, 64, 3)
        >>> sd.text_to_image(["a red circle", "a blue square"], num_steps=2, seed=3).shape
        (2, 64, 64, 3)
        """
        prompts = _prompt_list(prompt, "prompt")
        negatives = _negative_list(negative_prompt, len(prompts))
        _validate_positive_int("batch_size", batch_size)
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
        rows = _rows(len(prompts), items, batch_size)
        context = ops.take(self.encode_text(prompts), ops.convert_to_tensor(rows), axis=0)
        negative_rows = [negatives[i] for i in _rows(len(negatives), items, batch_size)]
        return context, negative_rows

    # ----------------------------------------------------------- image workflows
    def encode_image(self, image, *, value_range=None, resize: bool = False) -> np.ndarray:
        """VAE-encode images to the latents the UNet works on (scaled by the VAE factor).

        The latents are the mean of the encoder's posterior, so encoding is
        deterministic (diffusers' image pipelines draw a sample from it with their
        generator; pass `sample_mode="argmax"` there for the same latents).

        Args:
            image: any input `keras_sd.images.read_images` reads (uint8 array, float
                array with `value_range`, PIL image, path, list of them).
            value_range: the range of a float array's values: (0, 1), (-1, 1) or (0, 255).
            resize: resize to the nearest multiple of `size_multiple` instead of raising.

        Returns:
            float32 array [B, H / f, W / f, latent channels], f = `latent_factor`.

        Example:
        >>> sd = StableDiffusion(32, 32, config="tiny")
        >>> sd.encode_image(np.zeros((32, 32, 3), np.uint8)).shape
        (1, 16, 16, 4)
        """
        return self._encode_pixels(self._load_images(image, value_range, resize))

    def _load_images(self, image, value_range, resize):
        return images.load_images(
            image, self.size_multiple, value_range=value_range, resize=resize, name="image"
        )

    def _encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Images [B, H, W, 3] in [0, 1] -> scaled posterior-mean latents (numpy)."""
        encoder = self.image_encoder
        # Compiled on first use and again for a new encoder (the components may be assigned).
        cached = getattr(self, "_encoder_program", None)
        if cached is None or cached[0] is not encoder:
            program = backend.compile_function(backend.stateless(encoder), self.sampler.jit_compile)
            cached = self._encoder_program = (encoder, program)
        with backend.no_grad():
            moments = cached[1](backend.model_state(encoder), ops.convert_to_tensor(pixels * 2 - 1))
        moments = np.asarray(ops.convert_to_numpy(ops.cast(moments, "float32")))
        mean = moments[..., : encoder.latent_channels]  # moments: mean, then log-variance
        return mean * np.float32(encoder.scaling_factor)

    def _unet_takes_mask(self) -> bool:
        """Whether the UNet is an inpainting one: latents, mask and masked-image latents
        concatenated (9 channels for SD), rather than latents alone."""
        channels, latent = self.diffusion_model.in_channels, self.latent_channels
        if channels not in (latent, 2 * latent + 1):
            raise ValueError(
                f"diffusion_model takes {channels} input channels; image workflows need "
                f"{latent} (a text-to-image UNet) or {2 * latent + 1} (an inpainting UNet)."
            )
        return channels != latent

    def image_to_image(
        self,
        prompt,
        image,
        strength: float = 0.8,
        negative_prompt=None,
        batch_size: int = 1,
        num_steps: int = 50,
        unconditional_guidance_scale: float = 7.5,
        seed: int | None = None,
        *,
        value_range=None,
        resize: bool = False,
        diffusion_noise=None,
        scheduler=None,
        progress: bool = True,
    ) -> np.ndarray:
        """Redraw images guided by a prompt, keeping as much of them as `strength` says.

        The image is VAE-encoded (the posterior mean, see `encode_image`), noised to
        the timestep where the last `int(num_steps * strength)` of `num_steps` steps
        begin, and denoised through those steps, as diffusers'
        `StableDiffusionImg2ImgPipeline` does. Strength 1 runs every step from the
        image noised to the first timestep (not from pure noise); strength 0 (or any
        strength that runs no step) returns the VAE round trip of the image. With an
        inpainting UNet the whole image is repainted (mask of ones).

        Args:
            prompt: a string, or a list of strings (one output per prompt).
            image: uint8 `[H, W, 3]` / `[B, H, W, 3]`, a float array with `value_range`,
                a PIL image, a path, or a list of PIL images or paths (see
                `keras_sd.images.read_images`). H and W must be multiples of
                `size_multiple` unless `resize=True`.
            strength: in [0, 1]; the share of the denoising steps run.
            negative_prompt: a string, or one per prompt.
            batch_size: images per prompt (and image). Prompts and images pair up: a
                list of N prompts and a batch of N images give N outputs (each
                `batch_size` times); one prompt or one image serves all; other counts
                are refused.
            num_steps: steps of a full (strength 1) run.
            unconditional_guidance_scale: classifier-free guidance weight.
            seed: seed of the noise (numpy: the same on every backend).
            value_range: the range of a float array's values: (0, 1), (-1, 1), (0, 255).
            resize: resize the image to the nearest multiple of `size_multiple`.
            diffusion_noise: the standard normal noise mixed into the image latents
                (for `inpaint` at strength 1, the starting latents), `[B, h, w, C]` or
                `[h, w, C]`, instead of `seed`'s.
            scheduler: overrides `self.scheduler` for this call.
            progress: show a progress bar over the denoising steps.

        Returns:
            np.uint8 array [outputs * batch_size, H, W, 3].

        Example:
        >>> sd = StableDiffusion.from_preset("tiny-shapes")  # doctest: +SKIP
        >>> from keras_sd import shapes
        >>> red = shapes.render(shapes.Combination("circle", "red", "blue"))  # uint8 [64, 64, 3]
        >>> green = sd.image_to_image("a green circle on a blue background", red,
        ...                           strength=0.75, seed=0)  # doctest: +SKIP
        >>> shapes.read(green[0]).color  # doctest: +SKIP
        'green'
        """
        _check_strength(strength)
        return self._edit(
            prompt,
            self._load_images(image, value_range, resize),
            None,
            strength=strength,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
            num_steps=num_steps,
            guidance=unconditional_guidance_scale,
            seed=seed,
            diffusion_noise=diffusion_noise,
            scheduler=scheduler,
            progress=progress,
        )

    def inpaint(
        self,
        prompt,
        image,
        mask,
        strength: float = 1.0,
        negative_prompt=None,
        batch_size: int = 1,
        num_steps: int = 50,
        unconditional_guidance_scale: float = 7.5,
        seed: int | None = None,
        *,
        keep_unmasked: bool = True,
        value_range=None,
        resize: bool = False,
        diffusion_noise=None,
        scheduler=None,
        progress: bool = True,
    ) -> np.ndarray:
        """Repaint the masked part of images from a prompt.

        Works with both kinds of UNet, read from `diffusion_model.in_channels`: an
        inpainting UNet (9 channels for SD) sees the mask and the latents of the image
        with the masked pixels blanked at every step; a text-to-image UNet's latents
        outside the mask are replaced after every step by the image's, noised to the
        next step's level (the known-region blending of diffusers'
        `StableDiffusionInpaintPipeline`). Latent cells take the largest mask value of
        their pixels, so the repainted latents cover every masked pixel.

        Args:
            prompt: a string, or a list of strings (one output per prompt).
            image: as `image_to_image`.
            mask: where to repaint: 1 / True / white (diffusers' convention), 0 keeps;
                soft values in between blend. A float, bool or uint8 array `[H, W]`,
                `[H, W, 1]`, `[B, H, W]` or `[B, H, W, 1]`, a PIL image, a path (read
                as greyscale), or a list of them; of the image's size, one per image
                or one for all.
            strength: in [0, 1]. 1 (the default) starts the masked region from pure
                noise; below 1 it starts from the image noised as in `image_to_image`.
            keep_unmasked: paste the input pixels back outside the mask, so they
                survive exactly (the VAE round trip alters them), blending into the
                generated pixels over `latent_factor // 2` pixels inside the mask.
            negative_prompt, batch_size, num_steps, unconditional_guidance_scale, seed,
            value_range, resize, diffusion_noise, scheduler, progress: as
                `image_to_image`; with `resize=True` the mask is resized with the image.

        Returns:
            np.uint8 array [outputs * batch_size, H, W, 3].

        Example:
        >>> sd = StableDiffusion(32, 32, config="tiny")
        >>> image = np.zeros((32, 32, 3), np.uint8)
        >>> mask = np.zeros((32, 32), bool); mask[8:24, 8:24] = True
        >>> out = sd.inpaint("a red circle", image, mask, num_steps=2, seed=0)
        >>> out.shape, bool((out[0][~mask] == 0).all())
        ((1, 32, 32, 3), True)
        """
        _check_strength(strength)
        pixels = images.read_images(image, value_range=value_range)
        masks = images.read_masks(mask, pixels.shape[1:3])
        pixels = images.fit_to_factor(pixels, self.size_multiple, resize, "image")
        masks = images.fit_to_factor(masks, self.size_multiple, resize, "mask")
        return self._edit(
            prompt,
            pixels,
            masks,
            strength=strength,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
            num_steps=num_steps,
            guidance=unconditional_guidance_scale,
            seed=seed,
            diffusion_noise=diffusion_noise,
            scheduler=scheduler,
            progress=progress,
            keep_unmasked=keep_unmasked,
        )

    def outpaint(
        self,
        prompt,
        image,
        extend,
        strength: float = 1.0,
        negative_prompt=None,
        batch_size: int = 1,
        num_steps: int = 50,
        unconditional_guidance_scale: float = 7.5,
        seed: int | None = None,
        *,
        keep_unmasked: bool = True,
        value_range=None,
        resize: bool = False,
        diffusion_noise=None,
        scheduler=None,
        progress: bool = True,
    ) -> np.ndarray:
        """Grow images by a border and paint it from a prompt (inpainting the border).

        The new border is first filled by repeating the image's edge pixels (what a
        strength below 1 starts from), then inpainted with the border as the mask.

        Args:
            prompt: a string, or a list of strings.
            image: as `image_to_image`.
            extend: `(top, right, bottom, left)` pixels to add, or one int for every
                side; each is rounded up to a multiple of `size_multiple`.
            strength, keep_unmasked, ...: as `inpaint`; with `keep_unmasked` the
                original pixels come back exactly.

        Returns:
            np.uint8 array [outputs * batch_size, top + H + bottom, left + W + right, 3].

        Example:
        >>> sd = StableDiffusion.from_preset("tiny-shapes")  # doctest: +SKIP
        >>> image = np.zeros((64, 64, 3), np.uint8)
        >>> sd.outpaint("a black background", image, (0, 16, 0, 16)).shape  # doctest: +SKIP
        (1, 64, 96, 3)
        """
        _check_strength(strength)
        pixels = self._load_images(image, value_range, resize)
        canvas, masks, _ = images.extend_canvas(pixels, extend, self.size_multiple)
        return self._edit(
            prompt,
            canvas,
            masks,
            strength=strength,
            negative_prompt=negative_prompt,
            batch_size=batch_size,
            num_steps=num_steps,
            guidance=unconditional_guidance_scale,
            seed=seed,
            diffusion_noise=diffusion_noise,
            scheduler=scheduler,
            progress=progress,
            keep_unmasked=keep_unmasked,
        )

    def _edit(
        self,
        prompt,
        pixels,
        masks,
        *,
        strength,
        negative_prompt,
        batch_size,
        num_steps,
        guidance,
        seed,
        diffusion_noise,
        scheduler,
        progress,
        keep_unmasked=False,
    ) -> np.ndarray:
        """The image workflows after input reading: pixels [B, H, W, 3] in [0, 1],
        masks [M, H, W, 1] (None for image-to-image)."""
        _check_sampling_args(batch_size, num_steps, guidance, seed, diffusion_noise)
        scheduler = scheduler or self.scheduler
        scheduler.check_num_steps(num_steps)
        takes_mask = self._unet_takes_mask()
        prompts = _prompt_list(prompt, "prompt")
        negatives = _negative_list(negative_prompt, len(prompts))
        counts = {"prompt": len(prompts), "image": len(pixels)}
        if masks is not None:
            counts["mask"] = len(masks)
        items = _item_count(counts)
        context, negative_rows = self._text_rows(prompts, negatives, items, batch_size)
        uncond = None
        if guidance > 1.0:
            uncond = self.encode_text(negative_rows)
        image_rows = _rows(len(pixels), items, batch_size)
        image_latents = self._encode_pixels(pixels)[image_rows]  # [R, h, w, C]
        pixels = pixels[image_rows]
        if masks is not None:
            masks = masks[_rows(len(masks), items, batch_size)]
        if int(num_steps * strength) == 0:
            return self._finish(self.decode_latents(image_latents), pixels, masks, keep_unmasked)
        noise = _noise(image_latents.shape, seed, diffusion_noise)
        if masks is not None and strength == 1.0:
            latents = noise * np.float32(scheduler.init_noise_sigma)  # as diffusers' inpainting
        else:
            start = scheduler.schedule(num_steps, strength)["timesteps"][0]
            timesteps = ops.convert_to_tensor(np.full(len(noise), start, np.int32))
            latents = scheduler.add_noise(ops.convert_to_tensor(image_latents), noise, timesteps)
        inpaint = {}
        if takes_mask:
            model_masks = np.ones_like(pixels[..., :1]) if masks is None else masks
            # diffusers blanks (to 0 in [-1, 1]) the pixels repainted by more than half.
            # Rows come in runs of batch_size equal ones: encode one of each.
            blanked = np.where(model_masks < 0.5, pixels, np.float32(0.5))[::batch_size]
            inpaint = {
                "mask": images.latent_mask(model_masks, self.latent_factor),
                "masked_image_latents": np.repeat(self._encode_pixels(blanked), batch_size, axis=0),
            }
        elif masks is not None:
            inpaint = {
                "mask": images.latent_mask(masks, self.latent_factor),
                "image_latents": image_latents,
                "blend_noise": noise,
            }
        latents = self._denoise(
            scheduler,
            latents,
            context,
            uncond,
            guidance=guidance,
            num_steps=num_steps,
            seed=seed,
            progress=progress,
            strength=strength,
            **{k: ops.convert_to_tensor(v) for k, v in inpaint.items()},
        )
        return self._finish(self.decode_latents(latents), pixels, masks, keep_unmasked)

    def _finish(self, generated, pixels, masks, keep_unmasked):
        if masks is None or not keep_unmasked:
            return generated
        return images.paste_back(generated, pixels, masks, max(1, self.latent_factor // 2))


def _validate_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; received {value!r}.")


def _expand_batch(tensor, batch_size: int, name: str, rank: int = 3):
    """Repeat a single item ([1, ...] or unbatched) to `batch_size` items."""
    tensor = ops.convert_to_tensor(tensor)
    if len(tensor.shape) == rank - 1:
        tensor = ops.expand_dims(tensor, 0)
    if len(tensor.shape) != rank:
        raise ValueError(
            f"{name} must have rank {rank} or {rank - 1}; received shape {tuple(tensor.shape)}."
        )
    if tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] == 1:
        return ops.repeat(tensor, batch_size, axis=0)
    raise ValueError(
        f"{name} has batch {tensor.shape[0]} but batch_size is {batch_size}; "
        "give one item or batch_size items."
    )


def _check_sampling_args(batch_size, num_steps, guidance, seed, diffusion_noise) -> None:
    _validate_positive_int("batch_size", batch_size)
    _validate_positive_int("num_steps", num_steps)
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"unconditional_guidance_scale must be a number; received {guidance!r}.")
    if diffusion_noise is not None and seed is not None:
        raise ValueError("Pass either diffusion_noise or seed, not both.")


def _check_strength(strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a number in [0, 1]; received {strength!r}.")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1]; received {strength!r}.")


def _noise(shape, seed, diffusion_noise) -> np.ndarray:
    """Standard normal float32 noise of `shape`: drawn from `seed` (numpy, the same on
    every backend) or the caller's `diffusion_noise` ([B, ...] or one item)."""
    if diffusion_noise is None:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    noise = _expand_batch(diffusion_noise, shape[0], "diffusion_noise", rank=len(shape))
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(
            f"diffusion_noise must have shape {tuple(shape)} for this size and batch; "
            f"received {tuple(noise.shape)}."
        )
    return np.asarray(ops.convert_to_numpy(ops.cast(noise, "float32")))


def _prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings; received {prompt!r}.")


def _negative_list(negative_prompt, count: int) -> list[str]:
    if negative_prompt is None:
        return [""]
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) not in (1, count):
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries but prompt has {count}; "
            "give one negative prompt, or one per prompt."
        )
    return negatives


def _item_count(counts: dict) -> int:
    """How many outputs (before `batch_size`) arguments of these batch sizes make: one of
    each serves all, the others must agree."""
    items = max(counts.values())
    if any(count not in (1, items) for count in counts.values()):
        given = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise ValueError(
            f"prompt, image and mask counts must be 1 or one number ({given}): a list of "
            "prompts pairs with a batch of images of the same length."
        )
    return items


def _rows(count: int, items: int, batch_size: int) -> np.ndarray:
    """For each of `items * batch_size` rows, which of `count` entries (1 or `items`) it
    takes: item i's `batch_size` images are consecutive, as diffusers orders them."""
    return np.repeat(np.arange(items) if count > 1 else np.zeros(items, int), batch_size)
