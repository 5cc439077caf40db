"""Benchmark workers: one runtime in one process, started by `bench.py`.

    python benchmarks/runners.py SPEC.json

A worker reads its spec (runtime, variant, cases, weights folder), builds that
runtime's Stable Diffusion on the shared weights, times it and appends one JSON
line per case to the spec's results file. Processes keep backends apart (Keras
picks its backend at import; TensorFlow, JAX and PyTorch each keep their own
thread pools and allocators) and make peak memory a per-runtime figure.

Every figure is a wall-clock measurement taken here; nothing is extrapolated.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from functools import cache, partial
from operator import itemgetter

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"
UNET_TIMESTEP = 500
GIB = 1024**3
TICKS, CORES = os.sysconf("SC_CLK_TCK"), os.cpu_count()
START = time.perf_counter()  # as early as this process can take it: imports count


# ----------------------------------------------------------------- measuring
class RSSMonitor:
    """Samples this process's resident memory every `interval` seconds.

    `ru_maxrss` only grows, so it cannot tell the peak of one phase (a case) from
    the peak of weight loading; a sampler can.
    """

    def __init__(self, interval: float = 0.01):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.interval = interval
        self.peak = self.current()
        threading.Thread(target=self._run, daemon=True).start()

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while True:
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = self.current()


def max_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def busy_jiffies() -> int:
    """CPU time spent busy by the whole machine (all processes), in clock ticks."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return user + nice + system + irq + softirq + steal


def timed(fn, repeats: int):
    """Run `fn` once cold, then `repeats` times warm; `fn` must block until done.

    Returns:
        (first-call seconds, warm runs, the first call's result); each warm run is
        (wall s, this process's CPU s, share of the machine's cores other processes
        kept busy meanwhile). CPU seconds grow far less than wall time when other
        processes compete for the cores; the share says how much they did.
    """
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        busy, start_cpu = busy_jiffies(), time.process_time()
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
        cpu = time.process_time() - start_cpu
        others = (busy_jiffies() - busy) / TICKS - cpu
        runs.append((wall, cpu, max(0.0, others) / (wall * CORES)))
    return first, runs, result


def noise(seed: int, shape) -> np.ndarray:
    """The same seeded float32 normal array in every worker (numpy, channels-last)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def input_image(size: int) -> np.ndarray:
    """The image_to_image input of every worker: a smooth uint8 [size, size, 3] gradient
    (not noise, which no VAE reproduces)."""
    ramp = np.linspace(0.0, 255.0, size, dtype=np.float32)
    red, green = np.meshgrid(ramp, ramp[::-1])
    return np.stack([red, green, np.full_like(red, 128.0)], axis=-1).astype(np.uint8)


def measure(spec, case, calls, monitor) -> dict:
    """Time one case's four blocking callables and return its result row.

    Args:
        calls: {"unet": `unet(n)` one UNet call on the first n of 2B inputs, "t2i":
            text_to_image returning uint8 images, "encode": the prompt and the negative
            prompt encoded, "decode": the VAE decoder on B latents, and with --img2img
            "i2i": image_to_image of `input_image` at the spec's strength}, each a named
            function bound to the case's inputs with `partial`.
    """
    monitor.reset()
    steps, batch = spec["steps"], case["batch"]
    unet = timed(partial(calls["unet"], 2 * batch), spec["repeats"])
    # Batch B too: the cost of guidance as two half-batch calls (KerasCV's loop) instead
    # of one. Not for torch.compile: a new shape is another compilation of a minute or more.
    half = timed(partial(calls["unet"], batch), spec["repeats"]) if spec["half_batch"] else None
    t2i = timed(calls["t2i"], spec["t2i_repeats"])
    i2i = timed(calls["i2i"], spec["t2i_repeats"]) if "i2i" in calls else None
    encode = timed(calls["encode"], 3)
    decode = timed(calls["decode"], 2)
    # Best of the warm repeats: on a shared machine other processes only ever add time.
    best = {name: min(runs[1], key=itemgetter(0)) if runs and runs[1] else None
            for name, runs in (("unet", unet), ("half", half), ("t2i", t2i),
                               ("encode", encode), ("decode", decode))}  # fmt: skip
    t2i_warm = best["t2i"][0] if best["t2i"] else t2i[0]
    encode_s, decode_s = best["encode"][0], best["decode"][0]
    path = os.path.join(spec["out_dir"], f"{spec['name'].replace('/', '_')}-{case['id']}.npy")
    np.save(path, t2i[2])
    row = {
        **case,
        "name": spec["name"],
        "steps": steps,
        "unet_first_s": unet[0],
        "unet_s": best["unet"][0],
        "unet_cpu_s": best["unet"][1],
        "unet_others": best["unet"][2],
        "unet_median_s": statistics.median(run[0] for run in unet[1]),
        "unet_all_s": [run[0] for run in unet[1]],
        "unet_half_s": best["half"][0] if best["half"] else None,
        "unet_half_cpu_s": best["half"][1] if best["half"] else None,
        "t2i_first_s": t2i[0],
        "t2i_s": t2i_warm,
        "t2i_all_s": [run[0] for run in t2i[1]],
        "t2i_cpu_s": best["t2i"][1] if best["t2i"] else None,
        "t2i_others": best["t2i"][2] if best["t2i"] else None,
        "encode_s": encode_s,
        "decode_s": decode_s,
        # Derived from the measurements above by subtraction, not estimated.
        "loop_step_s": (t2i_warm - decode_s - encode_s) / steps,
        "image_s": t2i_warm / batch,
        "compile_s": t2i[0] - t2i_warm,
        "unet_finite": bool(np.isfinite(np.asarray(unet[2], np.float32)).all()),
        "images": path,
        "case_peak_rss_gb": monitor.peak / GIB,
        "max_rss_gb": max_rss() / GIB,
        "loadavg": os.getloadavg()[0],
    }
    if i2i:
        i2i_warm = min(run[0] for run in i2i[1]) if i2i[1] else i2i[0]
        row.update(
            i2i_first_s=i2i[0],
            i2i_s=i2i_warm,
            i2i_all_s=[run[0] for run in i2i[1]],
            i2i_image_s=i2i_warm / batch,
            i2i_strength=spec["img2img_strength"],
        )
    return row


def gpu_memory(framework: str):
    """(reset, peak bytes, bytes in use) of the framework's GPU allocator, or None
    without a GPU."""
    if framework == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            return None
        return (
            lambda: tf.config.experimental.reset_memory_stats("GPU:0"),
            lambda: tf.config.experimental.get_memory_info("GPU:0")["peak"],
            lambda: tf.config.experimental.get_memory_info("GPU:0")["current"],
        )
    if framework == "jax":
        import jax

        device = jax.local_devices()[0]
        if device.platform == "cpu":
            return None
        # JAX cannot reset its peak: later cases report the peak since start.
        return (
            lambda: None,
            lambda: device.memory_stats()["peak_bytes_in_use"],
            lambda: device.memory_stats()["bytes_in_use"],
        )
    import torch

    if not torch.cuda.is_available():
        return None
    return (
        torch.cuda.reset_peak_memory_stats,
        torch.cuda.max_memory_allocated,
        torch.cuda.memory_allocated,
    )


def run_cases(spec, emit, monitor, setup: dict, make_calls, framework: str) -> None:
    """Measure every case of the spec; `setup` times go on the first row only.

    GPU memory, where there is a GPU: the allocator's peak during the case
    (`gpu_peak_gb`; on JAX the peak since the process started), its peak before the
    case's first call (`gpu_peak_before_gb`: on JAX the peak of building and loading,
    for the first case) and what stays allocated after the case (`gpu_in_use_gb`).

    Args:
        make_calls: `make_calls(case)`, the runtime's `*_calls` function bound to its
            model with `partial`, returning the dict `measure` times.
    """
    gpu = gpu_memory(framework)
    for case in spec["cases"]:
        calls = make_calls(case)
        # KerasCV builds per image size: its build time goes on that size's first row.
        setup = {**setup, "build_s": setup.get("build_s", 0.0) + calls.pop("build_s", 0.0)}
        if gpu:
            before = gpu[1]()
            gpu[0]()
        row = {**setup, **measure(spec, case, calls, monitor)}
        if gpu:
            row["gpu_peak_gb"] = gpu[1]() / GIB
            row["gpu_peak_before_gb"] = before / GIB
            row["gpu_in_use_gb"] = gpu[2]() / GIB
        emit(row)
        setup = {"import_s": 0.0, "build_s": 0.0, "load_s": 0.0}


# ------------------------------------------------------------------ keras-sd
# The timed calls below are module-level functions bound to one case's inputs with
# `partial`; runtimes are imported inside them because each worker process imports
# only its own runtime (Keras fixes its backend at import).
def keras_sd_unet(unet_fn, state, x, t, ctx, n: int) -> np.ndarray:
    """One stateless compiled UNet call on the first n inputs, blocking (numpy out)."""
    from keras import ops

    from keras_sd import backend

    with backend.no_grad():
        return ops.convert_to_numpy(unet_fn(state, x[:n], t[:n], ctx[:n]))


def keras_sd_t2i(sd, latents, size: int, batch: int, steps: int, guidance: float):
    """keras-sd's `text_to_image` from fixed initial latents; uint8 images."""
    return sd.text_to_image(
        PROMPT,
        batch_size=batch,
        num_steps=steps,
        unconditional_guidance_scale=guidance,
        diffusion_noise=latents,
        width=size,
        height=size,
        progress=False,
    )


def keras_sd_i2i(sd, image, latents, batch: int, steps: int, guidance: float, strength: float):
    """keras-sd's `image_to_image` with fixed noise; uint8 images."""
    return sd.image_to_image(
        PROMPT,
        image,
        strength=strength,
        batch_size=batch,
        num_steps=steps,
        unconditional_guidance_scale=guidance,
        diffusion_noise=latents,
        progress=False,
    )


def keras_sd_encode(sd) -> list:
    """The prompt and the negative prompt encoded, as numpy arrays."""
    from keras import ops

    return [ops.convert_to_numpy(sd.encode_text(p)) for p in (PROMPT, "")]


def keras_sd_calls(sd, unet_fn, state, spec, case) -> dict:
    """keras-sd's four timed callables on one case's inputs (see `measure`)."""
    from keras import ops

    size, batch, channels = case["size"], case["batch"], sd.latent_channels
    h = size // sd.latent_factor
    x = ops.convert_to_tensor(noise(1, (2 * batch, h, h, channels)))
    t = ops.convert_to_tensor(np.full((2 * batch,), UNET_TIMESTEP, np.int32))
    ctx_shape = (2 * batch, sd.tokenizer.max_length, sd.text_encoder.hidden_dim)
    ctx = ops.convert_to_tensor(noise(2, ctx_shape))
    latents = noise(spec["seed"], (batch, h, h, channels))
    calls = {
        "unet": partial(keras_sd_unet, unet_fn, state, x, t, ctx),
        "t2i": partial(keras_sd_t2i, sd, latents, size, batch, spec["steps"], spec["guidance"]),
        "encode": partial(keras_sd_encode, sd),
        "decode": partial(sd.decode_latents, latents),
    }
    if spec.get("img2img_strength") is not None:
        i2i_args = (batch, spec["steps"], spec["guidance"], spec["img2img_strength"])
        calls["i2i"] = partial(keras_sd_i2i, sd, input_image(size), latents, *i2i_args)
    return calls


def run_keras_sd(spec, emit, monitor):
    import keras

    # Before keras_sd is imported and the model built: the loader honours the policy.
    keras.mixed_precision.set_global_policy(spec["policy"])
    import keras_sd
    from keras_sd import StableDiffusion, backend  # noqa: F401  (import, not load time)
    from keras_sd.models.conv import set_conv_algorithm

    # As the keras-sd command does; a spec's env may choose otherwise (/tf-default-alloc).
    backend.use_pooled_host_memory()

    set_conv_algorithm(spec.get("conv_algorithm", "auto"))
    t0 = time.perf_counter()
    first = spec["cases"][0]["size"]
    sd = keras_sd.StableDiffusion.from_checkpoint(
        spec["weights"], img_width=first, img_height=first, jit_compile=spec["jit"]
    )
    # One call builds and loads (streamed, no random init): reported as load time,
    # as for diffusers' from_pretrained.
    setup = {"import_s": t0 - START, "build_s": 0.0, "load_s": time.perf_counter() - t0}
    unet_fn = backend.compile_function(backend.stateless(sd.diffusion_model), spec["jit"])
    state = backend.model_state(sd.diffusion_model)
    make_calls = partial(keras_sd_calls, sd, unet_fn, state, spec)
    run_cases(spec, emit, monitor, setup, make_calls, keras.backend.backend())


# ----------------------------------------------------------------- diffusers
def to_torch(array: np.ndarray, device: str, dtype):
    """Channels-last numpy to a channels-first torch tensor on `device`."""
    import torch

    if array.ndim == 4:
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, dtype)


def torch_sync(device: str) -> None:
    """Wait for queued GPU work, so a timed call ends when its result exists."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def diffusers_unet(unet, x, t, ctx, n: int) -> np.ndarray:
    """One UNet call on the first n inputs (numpy out, which synchronizes).

    The arguments are the pipeline's own (diffusers 0.42), so that torch.compile
    compiles the UNet once for these calls and text_to_image alike.
    """
    import torch

    with torch.inference_mode():
        out = unet(
            x[:n],
            t,
            encoder_hidden_states=ctx[:n],
            timestep_cond=None,
            cross_attention_kwargs=None,
            added_cond_kwargs=None,
            return_dict=False,
        )[0]
        return out.float().cpu().numpy()


def diffusers_t2i(pipe, latents, size, batch, steps, guidance, device, dtype) -> np.ndarray:
    """The diffusers pipeline from fixed initial latents; uint8 images like keras-sd's."""
    import torch

    with torch.inference_mode():
        out = pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=batch,
            latents=to_torch(latents, device, dtype),
            output_type="np",
        ).images
        return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def diffusers_i2i(pipe, image, batch, steps, guidance, strength, device) -> np.ndarray:
    """diffusers' StableDiffusionImg2ImgPipeline (its generator draws the noise);
    uint8 images like keras-sd's."""
    import torch

    with torch.inference_mode():
        out = pipe(
            PROMPT,
            image=image[None].astype(np.float32) / 255.0,
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=batch,
            generator=torch.Generator(device).manual_seed(0),
            output_type="np",
        ).images
        return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def diffusers_encode(pipe, device: str):
    """The prompt and the negative prompt encoded (classifier-free guidance on)."""
    import torch

    with torch.inference_mode():
        embeds = pipe.encode_prompt(PROMPT, device, 1, True)
        torch_sync(device)
        return embeds


def diffusers_decode(vae, latents, device: str, dtype):
    """The VAE decoder on B latents (after the VAE scaling factor)."""
    import torch

    with torch.inference_mode():
        out = vae.decode(to_torch(latents, device, dtype) / vae.config.scaling_factor).sample
        torch_sync(device)
        return out


def diffusers_calls(pipe, i2i_pipe, device: str, dtype, spec, case) -> dict:
    """diffusers' four timed callables on one case's inputs (see `measure`)."""
    import torch

    unet = pipe.unet
    size, batch, channels = case["size"], case["batch"], unet.config.in_channels
    h = size // pipe.vae_scale_factor
    width = pipe.text_encoder.config.hidden_size
    ctx_shape = (2 * batch, pipe.tokenizer.model_max_length, width)
    # Inference tensors, like the pipeline's own: torch.compile guards on the
    # difference, and would compile the UNet a second time for text_to_image.
    with torch.inference_mode():
        x = to_torch(noise(1, (2 * batch, h, h, channels)), device, dtype)
        ctx = to_torch(noise(2, ctx_shape), device, dtype)
        t = torch.tensor(UNET_TIMESTEP, device=device)
    latents = noise(spec["seed"], (batch, h, h, channels))
    t2i_args = (size, batch, spec["steps"], spec["guidance"], device, dtype)
    calls = {
        "unet": partial(diffusers_unet, unet, x, t, ctx),
        "t2i": partial(diffusers_t2i, pipe, latents, *t2i_args),
        "encode": partial(diffusers_encode, pipe, device),
        "decode": partial(diffusers_decode, pipe.vae, latents, device, dtype),
    }
    if i2i_pipe is not None:
        i2i_args = (batch, spec["steps"], spec["guidance"], spec["img2img_strength"], device)
        calls["i2i"] = partial(diffusers_i2i, i2i_pipe, input_image(size), *i2i_args)
    return calls


def run_diffusers(spec, emit, monitor):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    dtype = getattr(torch, spec["dtype"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        spec["weights"], torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    if spec.get("torch_compile"):
        pipe.unet = torch.compile(pipe.unet)
    # diffusers builds and loads in one call; it is reported as load time.
    setup = {"import_s": t0 - START, "build_s": 0.0, "load_s": time.perf_counter() - t0}
    i2i_pipe = None
    if spec.get("img2img_strength") is not None:  # the same components, loaded once
        # from_pipe casts the shared modules to its own torch_dtype (float32 by default)
        i2i_pipe = StableDiffusionImg2ImgPipeline.from_pipe(pipe, torch_dtype=dtype)
        i2i_pipe.set_progress_bar_config(disable=True)
    make_calls = partial(diffusers_calls, pipe, i2i_pipe, device, dtype, spec)
    run_cases(spec, emit, monitor, setup, make_calls, "torch")


# ------------------------------------------------------------------ KerasCV
def import_keras_cv_without_tensorflow() -> None:
    """Make KerasCV's Stable Diffusion modules importable where TensorFlow is missing.

    `import keras_cv` imports TensorFlow whatever the Keras backend (its version
    check and its Keras 2 shims), yet under Keras 3 its Stable Diffusion modules use
    only `keras`, `keras.ops` and `keras.random`, through its `keras_cv.src.backend`
    shim. The GPU machines here have no TensorFlow (its wheel cannot be carried
    there), so the packages above those modules are registered without running
    their `__init__` files, and the shim gets what it selects under Keras 3: Keras'
    own modules. The model code and the sampling loop that then run are KerasCV's,
    unchanged. Does nothing where TensorFlow is installed.
    """
    import importlib.util
    import types

    if importlib.util.find_spec("tensorflow") is not None or "keras_cv" in sys.modules:
        return
    import keras

    root = os.path.dirname(importlib.util.find_spec("keras_cv").origin)

    def package(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, *name.split(".")[1:])]
        sys.modules[name] = module
        return module

    for name in ("keras_cv", "keras_cv.src", "keras_cv.src.models"):
        package(name)
    shim = package("keras_cv.src.backend")
    shim.keras, shim.ops, shim.random = keras, keras.ops, keras.random
    keras.backend.name_scope = keras.name_scope  # as the shim sets it under Keras 3


def shared_weights_for_keras_cv(folder: str, out: str) -> dict:
    """Write the shared weights (a diffusers folder) in KerasCV's order as .npy files
    under `out`: {component: [path]}.

    KerasCV reads no diffusers layout, so the folder is loaded with keras-sd, whose
    KerasCV reader knows which keras-sd variable each KerasCV weight is (the order of
    `keras_sd.weights.keras_cv`). The values go to files and keras-sd's models are
    dropped before anything is timed, so that KerasCV's memory figures stay its own;
    each model built later maps the files it needs (`keras_cv_set_weights`). keras-sd
    loads on the host, so that JAX's GPU peak (which cannot be reset) stays KerasCV's.
    """
    import contextlib
    import gc

    import keras

    from keras_sd import StableDiffusion
    from keras_sd.weights.keras_cv import _ORDERS
    from keras_sd.weights.state_dict import named_variables

    host = contextlib.nullcontext()
    if keras.backend.backend() == "jax":
        import jax

        host = jax.default_device(jax.devices("cpu")[0])
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        host = tf.device("/CPU:0")
    with host:
        sd = StableDiffusion.from_checkpoint(folder)
    paths = {}
    for component in ("text_encoder", "diffusion_model", "decoder"):
        model = getattr(sd, component)
        variables = named_variables(model)
        paths[component] = []
        for position, name in enumerate(_ORDERS[component](model, variables)):
            path = os.path.join(out, f"{component}-{position:04d}.npy")
            np.save(path, np.asarray(variables[name].numpy(), np.float32))
            paths[component].append(path)
    del sd, model, variables
    gc.collect()
    return paths


def keras_cv_set_weights(model, paths: list) -> None:
    """Give a KerasCV model the weights saved at `paths` (in its weight order), mapped
    from the files; 1x1 convolution kernels get their unit axes back."""
    arrays = [np.load(path, mmap_mode="r") for path in paths]
    model.set_weights([a.reshape(w.shape) for a, w in zip(arrays, model.weights, strict=True)])


def keras_cv_build(size: int, tokenizer, text_encoder, max_length: int, jit, weights: dict):
    """A KerasCV StableDiffusion for one image size around the shared text encoder,
    with the shared weights (`shared_weights_for_keras_cv`'s files)."""
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel
    from keras_cv.src.models.stable_diffusion.stable_diffusion import StableDiffusion

    sd = StableDiffusion(img_width=size, img_height=size, jit_compile=jit)
    if (sd.img_width, sd.img_height) != (size, size):
        raise ValueError(f"KerasCV needs sizes that are multiples of 128; got {size}")
    sd._tokenizer, sd._text_encoder = tokenizer, text_encoder
    sd._diffusion_model = DiffusionModel(size, size, max_length, download_weights=False)
    sd._decoder = Decoder(size, size, download_weights=False)
    keras_cv_set_weights(sd._diffusion_model, weights["diffusion_model"])
    keras_cv_set_weights(sd._decoder, weights["decoder"])
    if jit:
        sd._diffusion_model.compile(jit_compile=True)
        sd._decoder.compile(jit_compile=True)
    return sd


def keras_cv_unet(model, inputs: dict, n: int):
    """One UNet call on the first n of each input."""
    return model.predict_on_batch({k: v[:n] for k, v in inputs.items()})


def keras_cv_t2i(sd, latents, batch: int, steps: int, guidance: float):
    """KerasCV's generation from fixed initial latents, prompt encoding included."""
    return sd.generate_image(
        sd.encode_text(PROMPT),
        batch_size=batch,
        num_steps=steps,
        unconditional_guidance_scale=guidance,
        diffusion_noise=latents,
    )


def keras_cv_encode(sd):
    """The prompt and KerasCV's (cached) unconditional context."""
    return sd.encode_text(PROMPT), sd._get_unconditional_context()


def keras_cv_calls(build, max_length: int, spec, case) -> dict:
    """KerasCV's four timed callables on one case's inputs, plus its build seconds.

    Args:
        build: `build(size)`, a cached `keras_cv_build` (one model per image size).
    """
    size, batch = case["size"], case["batch"]
    start = time.perf_counter()
    sd = build(size)
    build_s = time.perf_counter() - start
    h = size // 8  # KerasCV hard-codes the VAE factor
    inputs = {
        "latent": noise(1, (2 * batch, h, h, 4)),
        "timestep_embedding": np.asarray(sd._get_timestep_embedding(UNET_TIMESTEP, 2 * batch)),
        "context": noise(2, (2 * batch, max_length, 768)),
    }
    latents = noise(spec["seed"], (batch, h, h, 4))
    return {
        "unet": partial(keras_cv_unet, sd.diffusion_model, inputs),
        "t2i": partial(keras_cv_t2i, sd, latents, batch, spec["steps"], spec["guidance"]),
        "encode": partial(keras_cv_encode, sd),
        "decode": partial(sd.decoder.predict_on_batch, latents),
        "build_s": build_s,
    }


def run_keras_cv(spec, emit, monitor):
    """KerasCV's own StableDiffusion with the shared weights.

    KerasCV has no diffusers reader: the weights come through keras-sd and temporary
    files (`shared_weights_for_keras_cv`, reported as load time). Its components take
    the image size at construction, so the UNet and decoder are rebuilt per size
    (counted as build time); vocabulary download is avoided by handing its tokenizer
    keras-sd's bundled copy of the same BPE file.
    """
    import keras

    keras.mixed_precision.set_global_policy(spec["policy"])
    keras.utils.set_random_seed(spec["seed"])
    import importlib.resources

    import_keras_cv_without_tensorflow()

    from keras_cv.src.models.stable_diffusion.clip_tokenizer import SimpleTokenizer
    from keras_cv.src.models.stable_diffusion.constants import _UNCONDITIONAL_TOKENS
    from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder

    max_length = len(_UNCONDITIONAL_TOKENS)
    vocab = importlib.resources.files("keras_sd") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    jit = spec["jit"]
    t0 = time.perf_counter()
    files = tempfile.TemporaryDirectory(prefix="keras-cv-weights-", dir=spec["out_dir"])
    weights = shared_weights_for_keras_cv(spec["weights"], files.name)
    # load_s: keras-sd's load and the files, not KerasCV's own work.
    setup = {"import_s": t0 - START, "load_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    tokenizer = SimpleTokenizer(bpe_path=str(vocab))
    text_encoder = TextEncoder(max_length, download_weights=False)
    keras_cv_set_weights(text_encoder, weights["text_encoder"])
    if jit:
        text_encoder.compile(jit_compile=True)
    setup["build_s"] = time.perf_counter() - t0
    build = cache(
        partial(
            keras_cv_build,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            max_length=max_length,
            jit=jit,
            weights=weights,
        )
    )
    make_calls = partial(keras_cv_calls, build, max_length, spec)
    with files:
        run_cases(spec, emit, monitor, setup, make_calls, keras.backend.backend())


# ------------------------------------------------------------ shared weights
def make_weights(spec, emit, monitor):
    """Write seeded random SD weights as a diffusers folder (the one shared weight set).

    diffusers/transformers' own default initialisations, seeded, at the configs in
    the spec; the scheduler is DDIM with SD 1.5's noise schedule and the tokenizer
    files come from keras-sd's bundled vocabulary (nothing is downloaded).
    """
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    import keras_sd

    torch.manual_seed(spec["seed"])
    configs = spec["configs"]
    vocab_dir = tempfile.mkdtemp()
    vocab, merges = keras_sd.CLIPTokenizer().save_vocabulary(vocab_dir)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=HFTokenizer(vocab, merges, model_max_length=configs["max_length"]),
        unet=UNet2DConditionModel(**configs["unet"]),
        scheduler=DDIMScheduler(**configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(spec["weights"], safe_serialization=True)
    emit({"weights": spec["weights"], "seconds": time.perf_counter() - START})


# ------------------------------------------------------------------ start-up
def _emit_startup(emit, how: str, t_import: float, t_load: float) -> None:
    emit(
        {
            "how": how,
            "import_s": t_import - START,
            "build_s": 0.0,
            "load_s": t_load - t_import,
            "build_load_s": t_load - t_import,
            "max_rss_gb": max_rss() / GIB,
        }
    )


def startup_keras_sd(spec, emit, monitor):
    """Import keras-sd and load a full model from the diffusers folder, or from the same
    weights in a CompVis single file or a keras-layout file (one call)."""
    import keras_sd
    from keras_sd import StableDiffusion, backend  # noqa: F401  (imports Keras, timed as import)

    backend.use_pooled_host_memory()  # as the keras-sd command does
    t_import = time.perf_counter()
    keras_sd.StableDiffusion.from_checkpoint(spec["weights"])
    how = f"StableDiffusion.from_checkpoint({spec['source']})"
    _emit_startup(emit, how, t_import, time.perf_counter())


def startup_diffusers(spec, emit, monitor):
    """Import diffusers and load a StableDiffusionPipeline from the same folder, or from
    the same weights in a CompVis single file (configs from the folder, offline)."""
    import torch
    from diffusers import StableDiffusionPipeline

    kwargs = dict(torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    t_import = time.perf_counter()
    if spec["source"] == "single file":
        how = "StableDiffusionPipeline.from_single_file(file)"
        StableDiffusionPipeline.from_single_file(
            spec["weights"], config=spec["config"], local_files_only=True, **kwargs
        )
    else:
        how = "StableDiffusionPipeline.from_pretrained(folder)"
        StableDiffusionPipeline.from_pretrained(spec["weights"], **kwargs)
    _emit_startup(emit, how, t_import, time.perf_counter())


RUNNERS = {
    "keras-sd": run_keras_sd,
    "diffusers": run_diffusers,
    "keras-cv": run_keras_cv,
    "weights": make_weights,
    "startup-keras-sd": startup_keras_sd,
    "startup-diffusers": startup_diffusers,
}


def append_row(path: str, row: dict) -> None:
    """Append one result row to a JSON-lines file."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    RUNNERS[spec["runtime"]](spec, partial(append_row, spec["results"]), RSSMonitor())


if __name__ == "__main__":
    main(sys.argv[1])
