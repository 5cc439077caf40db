"""The image workflows of `StableDiffusion`: image-to-image, inpainting, outpainting.

A mixin of the pipeline class: the methods read inputs (`keras_sd.images`), encode
them with the VAE and run the same compiled loop as text-to-image with a start step
(strength), a mask and, for inpainting UNets, mask and masked-image channels.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_sd import arguments, backend, images


class ImageWorkflows:
    """`encode_image`, `image_to_image`, `inpaint` and `outpaint` (mixed into
    `keras_sd.StableDiffusion`, whose components and compiled loop they use)."""

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
        >>> from keras_sd import StableDiffusion
        >>> sd = StableDiffusion(32, 32, config="tiny")
        >>> sd.encode_image(np.zeros((32, 32, 3), np.uint8)).shape
        (1, 16, 16, 4)
        """
        return self._encode_pixels(self._load_images(image, value_range, resize))

    def _load_images(self, image, value_range, resize):
        arguments.check_flag("resize", resize)
        return images.load_images(
            image, self.size_multiple, value_range=value_range, resize=resize, name="image"
        )

    def _encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Images [B, H, W, 3] in [0, 1] -> scaled posterior-mean latents (numpy)."""
        encoder = self.image_encoder
        program, weights = self._stateless_program("image_encoder")
        with backend.no_grad():
            moments = program(weights, ops.convert_to_tensor(pixels * 2 - 1))
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
        arguments.check_strength(strength)
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
        >>> from keras_sd import StableDiffusion
        >>> sd = StableDiffusion(32, 32, config="tiny")
        >>> image = np.zeros((32, 32, 3), np.uint8)
        >>> mask = np.zeros((32, 32), bool); mask[8:24, 8:24] = True
        >>> out = sd.inpaint("a red circle", image, mask, num_steps=2, seed=0)
        >>> out.shape, bool((out[0][~mask] == 0).all())
        ((1, 32, 32, 3), True)
        """
        arguments.check_strength(strength)
        arguments.check_flag("resize", resize)
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
        arguments.check_strength(strength)
        pixels = self._load_images(image, value_range, resize)
        arguments.check_extend(extend, pixels.shape[1:3])
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
        takes_mask = self._unet_takes_mask()
        prompts = arguments.prompt_list(prompt, "prompt")
        negatives = arguments.negative_list(negative_prompt, len(prompts))
        arguments.check_flag("keep_unmasked", keep_unmasked)
        counts = {"prompt": len(prompts), "image": len(pixels)}
        if masks is not None:
            counts["mask"] = len(masks)
        items = arguments.item_count(counts)
        scheduler, _, _ = arguments.check_run(
            self, batch_size, num_steps, guidance, seed, items, diffusion_noise=diffusion_noise,
            scheduler=scheduler, width=pixels.shape[2], height=pixels.shape[1], progress=progress,
        )  # fmt: skip
        context, negative_rows = self._text_rows(prompts, negatives, items, batch_size)
        uncond = None
        if guidance > 1.0:
            uncond = self.encode_text(negative_rows)
        image_rows = arguments.rows(len(pixels), items, batch_size)
        image_latents = self._encode_pixels(pixels)[image_rows]  # [R, h, w, C]
        pixels = pixels[image_rows]
        if masks is not None:
            masks = masks[arguments.rows(len(masks), items, batch_size)]
        if int(num_steps * strength) == 0:
            return self._finish(self.decode_latents(image_latents), pixels, masks, keep_unmasked)
        noise = arguments.noise_like(image_latents.shape, seed, diffusion_noise)
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
