"""The denoising loop, compiled as one program.

Every step of the loop (scheduler input scaling, one UNet call on the
unconditional and conditional halves stacked into one batch, guidance, the
scheduler update and, for inpainting, re-blending the known region) runs inside
`keras.ops.fori_loop` in a single compiled function: no Python per step and no
host round-trip. The loop carries the scheduler's state (`init_state`: the
sample, plus earlier outputs for multistep solvers). Programs are kept per UNet
architecture, scheduler class and configuration and mode, and shared by every sampler
in the process (`keras_sd.backend.programs`); within one, the backend caches a trace
per input shape, so a new prompt, seed, guidance scale, image-to-image strength (a
start index into the full schedule) or UNet of the same architecture reuses the
program and only a new batch size, image size or step count traces again.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
from keras import ops

from keras_sd import backend


class Sampler:
    """Runs a scheduler's denoising loop around one UNet.

    Args:
        unet: a built `keras_sd.models.unet.UNet` (or any model called as
            `unet(latents, timesteps, context)`).
        jit_compile: True, False or "auto"; see `keras_sd.backend.compile_function`.

    Example:
    >>> sampler = Sampler(unet, jit_compile=True)  # doctest: +SKIP
    >>> latents = sampler(DDIMScheduler(), noise, context, uncond_context,
    ...                   guidance_scale=7.5, num_steps=50)  # doctest: +SKIP
    """

    def __init__(self, unet, jit_compile="auto"):
        backend.validate_jit_compile(jit_compile)
        self.unet = unet
        self.jit_compile = jit_compile
        self.trace_count = 0  # traces this sampler's calls made
        # Compiled programs call this trampoline, so a new callback needs no retrace.
        self._callback = None

    def __call__(
        self,
        scheduler,
        latents,
        context,
        unconditional_context=None,
        guidance_scale: float = 7.5,
        num_steps: int = 50,
        strength: float = 1.0,
        step_noise=None,
        mask=None,
        masked_image_latents=None,
        image_latents=None,
        blend_noise=None,
        callback=None,
    ):
        """Denoise `latents` and return the final latents (float32, [B, h, w, C]).

        Args:
            scheduler: a keras-sd scheduler.
            latents: starting latents [B, h, w, C] (noise for text-to-image, noised
                image latents for image-to-image).
            context: text embeddings [B, L, D].
            unconditional_context: embeddings of the negative prompt [B, L, D];
                used when `guidance_scale > 1`, as one batched UNet call with `context`.
            guidance_scale: classifier-free guidance weight (1 disables guidance).
            num_steps: scheduler steps for the full noise range.
            strength: fraction of those steps actually run (image-to-image).
            step_noise: [num_steps, B, h, w, C] standard normal noise for
                stochastic schedulers (DDIM with eta > 0), indexed by step (a
                strength < 1 run uses the last entries); None otherwise.
            mask: [B, h, w, 1], 1 where the image is repainted (inpainting).
            masked_image_latents: latents of the masked image, concatenated with
                `mask` to the UNet input of 9-channel inpainting models.
            image_latents, blend_noise: for 4-channel models, the known region is
                re-noised to the next step's level and blended back after each step.
            callback: `callback(step_index)` called on the host after each step
                (progress bars). TensorFlow XLA programs cannot call Python, so there
                the same program runs a range of steps per call and the steps are
                reported between calls.
        """
        schedule = scheduler.schedule(num_steps)
        first = scheduler.start_index(num_steps, strength)
        guided = guidance_scale > 1.0
        if guided and unconditional_context is None:
            raise ValueError("unconditional_context is required when guidance_scale > 1.")
        if guided:
            context = ops.concatenate([unconditional_context, context], axis=0)
        inpaint = {}
        if masked_image_latents is not None:
            inpaint.update(mask=mask, masked_image_latents=masked_image_latents)
        if image_latents is not None:
            inpaint.update(blend_mask=mask, image_latents=image_latents, blend_noise=blend_noise)
        # Where the backend can call the host from inside the program, progress is
        # reported there; otherwise (TensorFlow XLA) the same program runs a range of
        # steps per call and the steps are reported between calls.
        in_program = callback is not None and backend.supports_step_callback(self.jit_compile)
        from_host = callback is not None and not in_program
        key = (
            "sampler",
            backend.architecture_key(self.unet),
            type(scheduler),
            json.dumps(scheduler.get_config(), sort_keys=True, default=str),
            guided,
            step_noise is not None,
            tuple(sorted(inpaint)),
            in_program,
        )
        build = partial(_loop_fn, scheduler=scheduler, guided=guided, report=in_program)
        program = backend.shared_program(key, build, self.jit_compile)
        tables = {k: ops.convert_to_tensor(v) for k, v in schedule.items()}
        steps = len(schedule["timesteps"])
        chunk = _host_chunk(steps - first) if from_host else steps - first
        self._callback = callback
        weights = backend.model_state(self.unet)
        loop_state = scheduler.init_state(ops.cast(latents, "float32"), tables)
        guidance = ops.convert_to_tensor(np.float32(guidance_scale))
        with backend.no_grad():
            for start in range(first, steps, chunk):
                stop = min(start + chunk, steps)
                loop_state = program(
                    self,
                    weights,
                    loop_state,
                    context,
                    guidance,
                    tables,
                    step_noise,
                    inpaint,
                    ops.convert_to_tensor(np.int32(start)),
                    ops.convert_to_tensor(np.int32(stop)),
                )
                if from_host:
                    ops.convert_to_numpy(loop_state["sample"][:1, :1, :1, :1])  # wait for it
                    for step in range(start, stop):
                        callback(step - first)
        return loop_state["sample"]

    def _report(self, step: int) -> None:
        if self._callback is not None:
            self._callback(step)


def _loop_fn(owner, scheduler, guided, report):
    """The denoising loop of the sampler `owner()` (the one calling), as a function of
    the UNet's weights."""

    def loop(weights, loop_state, context, guidance, tables, step_noise, inpaint, start, stop):
        sampler = owner()
        sampler.trace_count += 1
        unet_call = backend.stateless(sampler.unet)
        timesteps = tables["timesteps"]
        num_steps = timesteps.shape[0]
        report_step = partial(_report, owner)

        def body(i, loop_state):
            x = loop_state["sample"]  # [B, h, w, C] float32
            model_in = scheduler.scale_model_input(x, i, tables)
            if "masked_image_latents" in inpaint:
                model_in = ops.concatenate(
                    [model_in, inpaint["mask"], inpaint["masked_image_latents"]], axis=-1
                )
            if guided:
                model_in = ops.concatenate([model_in, model_in], axis=0)  # [2B, h, w, C']
            t = ops.broadcast_to(ops.take(timesteps, i), (model_in.shape[0],))
            eps = ops.cast(unet_call(weights, model_in, t, context), "float32")
            if guided:
                eps_uncond, eps_cond = ops.split(eps, 2, axis=0)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            noise = None if step_noise is None else ops.take(step_noise, i, axis=0)
            loop_state = scheduler.step(loop_state, eps, i, tables, noise=noise)
            if "image_latents" in inpaint:
                x = _blend_known(scheduler, loop_state["sample"], i, timesteps, num_steps, inpaint)
                loop_state = {**loop_state, "sample": x}
            if report:  # in-program reporting runs the whole loop in one call
                after = loop_state["sample"][:1, :1, :1, :1]
                backend.step_callback(report_step, i - start, after)
            return loop_state

        return ops.fori_loop(start, stop, body, loop_state)

    return loop


def _report(owner, step: int) -> None:
    """Pass a step to the progress callback of the sampler whose call is running."""
    sampler = owner()
    if sampler is not None:
        sampler._report(step)


def _host_chunk(steps: int) -> int:
    """Steps per program call when progress is reported from the host: every step on
    a CPU (a step takes seconds there), about a tenth of the loop on an accelerator
    (where a call's own overhead is a noticeable part of a step)."""
    return 1 if not backend.has_accelerator() else max(1, -(-steps // 10))


def _blend_known(scheduler, x, i, timesteps, num_steps, inpaint):
    """Put the known region back, noised to the level of the next step."""
    known = inpaint["image_latents"]
    t_next = ops.take(timesteps, ops.minimum(i + 1, num_steps - 1))
    batch = x.shape[0]
    noised = scheduler.add_noise(known, inpaint["blend_noise"], ops.broadcast_to(t_next, (batch,)))
    known = ops.where(i < num_steps - 1, noised, known)  # the last step keeps the clean image
    mask = inpaint["blend_mask"]
    return (1.0 - mask) * known + mask * x
