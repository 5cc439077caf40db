"""The compiled denoising loop: one trace per shape, seeds, stochastic steps."""

from functools import partial

import numpy as np
import pytest

from keras_sd import DDIMScheduler, StableDiffusion


@pytest.fixture(scope="module")
def pipelines():
    """One tiny pipeline per `jit_compile` choice, built on first use and shared by the
    module's tests (building and tracing each anew would repeat the same work). Tests
    that count traces count the ones they add, with step counts no other test uses."""
    built = {}

    def pipeline(jit_compile):
        if jit_compile not in built:
            built[jit_compile] = StableDiffusion(32, 32, config="tiny", jit_compile=jit_compile)
        return built[jit_compile]

    return pipeline


@pytest.fixture
def sd(pipelines):
    return pipelines("auto")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_new_prompt_seed_or_guidance_does_not_retrace(pipelines, jit_compile, fresh_programs):
    sd = pipelines(jit_compile)
    traces = sd.sampler.trace_count
    first = sd.text_to_image("a red circle", num_steps=3, seed=1, progress=False)
    assert sd.sampler.trace_count == traces + 1
    second = sd.text_to_image(
        "a blue square",
        negative_prompt="a green star",
        num_steps=3,
        seed=2,
        unconditional_guidance_scale=5.0,
        progress=False,
    )
    assert sd.sampler.trace_count == traces + 1
    assert not np.array_equal(first, second)
    sd.text_to_image("a red circle", num_steps=4, seed=1, progress=False)  # new step count
    assert sd.sampler.trace_count == traces + 2


def test_same_seed_same_image_and_other_seed_differs(sd):
    a = sd.text_to_image("a red circle", num_steps=2, seed=5, progress=False)
    b = sd.text_to_image("a red circle", num_steps=2, seed=5, progress=False)
    c = sd.text_to_image("a red circle", num_steps=2, seed=6, progress=False)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_progress_callback_reports_every_step(sd):
    seen = []
    latents = np.zeros((1, 16, 16, 4), np.float32)
    context = sd.encode_text("a red circle")
    sd.sampler(
        DDIMScheduler(), latents, context, guidance_scale=1.0, num_steps=4, callback=seen.append
    )
    assert sorted(seen) == [0, 1, 2, 3]


def test_eta_uses_step_noise_deterministically(sd):
    scheduler = DDIMScheduler(eta=1.0)
    a = sd.text_to_image("a red circle", num_steps=3, seed=3, scheduler=scheduler, progress=False)
    b = sd.text_to_image("a red circle", num_steps=3, seed=3, scheduler=scheduler, progress=False)
    deterministic = sd.text_to_image("a red circle", num_steps=3, seed=3, progress=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, deterministic)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"width": 30}, "width must be a positive multiple of 4 .*received 30"),
        ({"unconditional_guidance_scale": "high"}, "unconditional_guidance_scale"),
        (
            {"seed": 1, "diffusion_noise": np.zeros((1, 16, 16, 4))},
            "either diffusion_noise or seed",
        ),
        ({"diffusion_noise": np.zeros((1, 8, 8, 4))}, "diffusion_noise must have shape"),
    ],
)
def test_bad_arguments_name_the_argument(sd, kwargs, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        sd.text_to_image("a red circle", progress=False, **kwargs)


def test_prompt_type_error(sd):
    with pytest.raises(TypeError, match="prompt must be a string or a non-empty list"):
        sd.text_to_image(3)


@pytest.mark.parametrize("num_steps", [1, 5])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_progress_reports_every_step_without_retracing(pipelines, jit_compile, num_steps):
    """TensorFlow XLA cannot call the host from inside the program: there the same
    program runs one range of steps per call, so progress still arrives per step and
    the result equals one uninterrupted run."""
    sd = pipelines(jit_compile)
    latents = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype("float32")
    context, uncond = sd.encode_text("a red circle"), sd.encode_text("")
    seen = []
    run = partial(sd.sampler, DDIMScheduler(), latents, context, uncond, num_steps=num_steps)
    stepped = run(callback=seen.append)
    traces = sd.sampler.trace_count
    run(callback=seen.append)
    assert sd.sampler.trace_count == traces
    assert seen == list(range(num_steps)) * 2
    whole = run()
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(whole), atol=1e-5)


def test_auto_compile_mode_follows_device_precision_and_size(monkeypatch):
    """On a CPU, "auto" is XLA for large models, except in a low precision the CPU has
    instructions for (the plain graph was measured faster there, and slower without
    them)."""
    import keras

    from keras_sd import backend

    if keras.backend.backend() != "tensorflow" or backend.has_accelerator():
        pytest.skip("the CPU rule is TensorFlow's; JAX always jits, GPUs always use XLA")
    large = backend.XLA_CPU_MIN_PARAMS
    for native in (frozenset(), frozenset({"bfloat16"}), frozenset({"bfloat16", "float16"})):
        # resolve_jit_compile asks cpu_native_dtypes in its own module: patch it there.
        monkeypatch.setattr(
            backend.devices, "_this_cpu_native_dtypes", lambda native=native: native
        )
        assert backend.resolve_jit_compile("auto", "float32", large) is True
        for dtype in ("bfloat16", "float16"):
            assert backend.resolve_jit_compile("auto", dtype, large) is (dtype not in native)
            assert backend.resolve_jit_compile("auto", dtype, large - 1) is False
    assert backend.resolve_jit_compile("auto", "float32", large - 1) is False
    assert backend.resolve_jit_compile(True, "bfloat16", 1) is True
    assert backend.resolve_jit_compile(False, "float32", large) is False
    with pytest.raises(ValueError, match="jit_compile"):
        backend.resolve_jit_compile("xla")
    assert StableDiffusion(32, 32, config="tiny").sampler.jit_compile is False


def test_cpu_native_dtypes_reads_the_instruction_flags():
    from keras_sd import backend

    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_fp16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd fphp asimdhp bf16\n"
    old = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nbugs\t\t: avx512_bf16\n"
    assert backend.cpu_native_dtypes(x86) == {"bfloat16", "float16"}
    assert backend.cpu_native_dtypes(arm) == {"bfloat16"}
    assert backend.cpu_native_dtypes(old) == frozenset()
    assert backend.cpu_native_dtypes("") == frozenset()
