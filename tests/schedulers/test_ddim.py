"""DDIMScheduler vs diffusers' DDIMScheduler (the independent reference)."""

import keras
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM
from keras import ops

from keras_sd.schedulers import DDIMScheduler, config_from_diffusers

# One step, both sides fed the same float32 inputs: a few ulps apart at the O(1)
# scale of real latents (measured max 7.2e-7; torch's CPU float32 sqrt is not
# correctly rounded, ours is).
STEP_ATOL = 1e-6
# A free-running float32 trajectory amplifies rounding: the epsilon DDIM map
# scales input differences by sqrt(a_prev / a_t) per step (~15x over a run), so
# two correct float32 implementations drift apart by ~1e-5 over 50 steps
# (measured max 1.1e-5), while a wrong coefficient moves results by >1e-2.
TRAJECTORY_ATOL = 1e-4
SHAPE = (2, 4, 8, 8)


def reference(sched: DDIMScheduler) -> TorchDDIM:
    """diffusers' scheduler with the same config (eta is a step argument there)."""
    cfg = sched.get_config()
    cfg.pop("eta")
    return TorchDDIM(**cfg)


def img2img_timesteps(ref: TorchDDIM, num_steps: int, strength: float) -> np.ndarray:
    # StableDiffusionImg2ImgPipeline.get_timesteps; DDIM has order 1.
    ref.set_timesteps(num_steps)
    t_start = max(num_steps - min(int(num_steps * strength), num_steps), 0)
    return ref.timesteps[t_start * ref.order :].numpy()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [10, 25, 50])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_timesteps_match_diffusers(spacing, num_steps, strength):
    sched = DDIMScheduler(timestep_spacing=spacing)
    got = sched.schedule(num_steps, strength=strength)["timesteps"]
    expected = img2img_timesteps(reference(sched), num_steps, strength)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


def test_alphas_cumprod_match_diffusers():
    for beta_schedule in ["scaled_linear", "linear"]:
        sched = DDIMScheduler(beta_schedule=beta_schedule)
        expected = reference(sched).alphas_cumprod.numpy()
        np.testing.assert_allclose(sched.alphas_cumprod, expected, rtol=2e-6, atol=0)


def noisy_oracle(sample, clean, alpha_prod, prediction_type, rng):
    """A random model output that keeps the trajectory at real-latent scale.

    The exact epsilon / v / x_0 of `sample` relative to a fixed clean sample,
    plus 0.3 N(0, 1). Purely random outputs would drive the epsilon trajectory to
    |x| ~ 50, where float32 ulps alone exceed the step tolerance.
    """
    eps = (sample - np.sqrt(alpha_prod) * clean) / np.sqrt(1.0 - alpha_prod)
    exact = {
        "epsilon": eps,
        "v_prediction": np.sqrt(alpha_prod) * eps - np.sqrt(1.0 - alpha_prod) * clean,
        "sample": clean,
    }[prediction_type]
    return (exact + 0.3 * rng.standard_normal(sample.shape)).astype(np.float32)


def ddim_step(sched, sample, model_output, index, tables, noise=None):
    """One update on a bare sample: the scheduler's state is `{"sample": x}`."""
    return sched.step({"sample": sample}, model_output, index, tables, noise=noise)["sample"]


def run_trajectories(sched: DDIMScheduler, num_steps: int, strength: float = 1.0):
    """Ours and diffusers' samples after every step, from the same random inputs.

    Returns (ours free-running, ours fed diffusers' previous sample each step,
    diffusers', the inputs).
    """
    rng = np.random.default_rng(0)
    tables = sched.schedule(num_steps, strength=strength)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    clean = np.clip(rng.standard_normal(SHAPE), -1.5, 1.5)
    ref = reference(sched)
    ref.set_timesteps(num_steps)
    free, forced, theirs, outputs, noises = [], [], [], [], []
    x, y = x0, x0
    for i, t in enumerate(tables["timesteps"]):
        alpha_prod = float(ref.alphas_cumprod[t])
        outputs.append(noisy_oracle(y, clean, alpha_prod, sched.prediction_type, rng))
        noises.append(rng.standard_normal(SHAPE).astype(np.float32))
        noise = noises[i] if sched.eta > 0 else None
        forced.append(ops.convert_to_numpy(ddim_step(sched, y, outputs[i], i, tables, noise=noise)))
        x = ops.convert_to_numpy(ddim_step(sched, x, outputs[i], i, tables, noise=noise))
        y = ref.step(
            torch.from_numpy(outputs[i]),
            int(t),
            torch.from_numpy(y),
            eta=sched.eta,
            variance_noise=torch.from_numpy(noises[i]),
        ).prev_sample.numpy()
        free.append(x)
        theirs.append(y)
    inputs = (x0, np.stack(outputs), np.stack(noises), tables)
    return np.stack(free), np.stack(forced), np.stack(theirs), inputs


def check_against_diffusers(sched: DDIMScheduler, num_steps: int, strength: float = 1.0):
    free, forced, theirs, _ = run_trajectories(sched, num_steps, strength)
    assert np.abs(forced - theirs).max() <= STEP_ATOL
    assert np.abs(free - theirs).max() <= TRAJECTORY_ATOL
    # The trajectory must actually move, or the comparison proves nothing.
    assert np.abs(theirs[-1] - theirs[0]).max() > 0.1
    return free


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_trajectory_matches_diffusers(prediction_type, eta):
    check_against_diffusers(DDIMScheduler(prediction_type=prediction_type, eta=eta), 50)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5),
        dict(timestep_spacing="trailing", set_alpha_to_one=True, beta_schedule="linear"),
        dict(timestep_spacing="linspace", steps_offset=0, eta=1.0),
    ],
)
def test_trajectory_variants_match_diffusers(kwargs):
    free = check_against_diffusers(DDIMScheduler(**kwargs), num_steps=10, strength=0.6)
    assert free.shape[0] == 6


def _compiled(fn):
    """Compile `fn` with the active backend's jit so the step index is traced."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def test_step_inside_fori_loop():
    sched = DDIMScheduler(prediction_type="v_prediction", eta=0.5)
    expected, _, _, (x0, outputs, noises, tables) = run_trajectories(sched, num_steps=10)
    tensor_tables = {k: ops.convert_to_tensor(v) for k, v in tables.items()}

    def sample(x, outputs, noises):
        def body(i, x):
            out = ops.take(outputs, i, axis=0)
            return ddim_step(sched, x, out, i, tensor_tables, noise=ops.take(noises, i, axis=0))

        return ops.fori_loop(0, len(tables["timesteps"]), body, x)

    args = [ops.convert_to_tensor(a) for a in (x0, outputs, noises)]
    # XLA (the compiled function; JAX's fori_loop even eagerly) fuses the step and
    # may contract to FMA, so float32 rounding differs (measured 7.2e-7 on CPU).
    for fn in (sample, _compiled(sample)):
        got = ops.convert_to_numpy(fn(*args))
        np.testing.assert_allclose(got, expected[-1], rtol=0, atol=1e-5)


def test_step_dtypes():
    sched = DDIMScheduler()
    tables = sched.schedule(10)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    out = rng.standard_normal(SHAPE).astype(np.float32)
    full = ops.convert_to_numpy(ddim_step(sched, x, out, 3, tables))
    half_out = ddim_step(sched, x, ops.cast(out, "float16"), 3, tables)
    assert keras.backend.standardize_dtype(half_out.dtype) == "float32"
    np.testing.assert_allclose(ops.convert_to_numpy(half_out), full, atol=1e-2)
    half_all = ddim_step(sched, ops.cast(x, "float16"), ops.cast(out, "float16"), 3, tables)
    assert keras.backend.standardize_dtype(half_all.dtype) == "float16"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_helpers_match_diffusers(prediction_type):
    sched = DDIMScheduler(prediction_type=prediction_type)
    ref = reference(sched)
    rng = np.random.default_rng(2)
    latents = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    timesteps = np.array([999, 17], dtype=np.int32)
    t_lat, t_noise, t_steps = (torch.from_numpy(a) for a in (latents, noise, timesteps.astype(int)))

    noisy = ops.convert_to_numpy(sched.add_noise(latents, noise, timesteps))
    expected_noisy = ref.add_noise(t_lat, t_noise, t_steps).numpy()
    np.testing.assert_allclose(noisy, expected_noisy, rtol=0, atol=1e-6)
    v = ops.convert_to_numpy(sched.velocity(latents, noise, timesteps))
    np.testing.assert_allclose(v, ref.get_velocity(t_lat, t_noise, t_steps).numpy(), atol=1e-6)

    target = ops.convert_to_numpy(sched.training_target(latents, noise, timesteps))
    expected_target = {"epsilon": noise, "v_prediction": v, "sample": latents}[prediction_type]
    np.testing.assert_allclose(target, expected_target, atol=1e-6)
    # A perfect prediction of the target recovers the clean latents.
    x0 = ops.convert_to_numpy(sched.predict_original(noisy, target, timesteps))
    np.testing.assert_allclose(x0, latents, atol=1e-4)

    out = rng.standard_normal(SHAPE).astype(np.float32)
    x0 = ops.convert_to_numpy(sched.predict_original(noisy, out, timesteps))
    ref.set_timesteps(10)
    for b, t in enumerate(timesteps):
        step = ref.step(torch.from_numpy(out[b]), int(t), torch.from_numpy(noisy[b]))
        np.testing.assert_allclose(x0[b], step.pred_original_sample.numpy(), rtol=1e-5, atol=1e-5)


def test_config_round_trip():
    sched = DDIMScheduler(
        beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="trailing", eta=0.3
    )
    clone = DDIMScheduler.from_config(sched.get_config())
    assert clone.get_config() == sched.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert isinstance(restored, DDIMScheduler)
    assert restored.get_config() == sched.get_config()
    for key, value in sched.schedule(20).items():
        np.testing.assert_array_equal(clone.schedule(20)[key], value)


SD14_CONFIG = {  # stable-diffusion-v1-4 scheduler/scheduler_config.json (a PNDM config)
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_CONFIG = {**SD14_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}


@pytest.mark.parametrize("cfg", [SD14_CONFIG, SD21_CONFIG, {}], ids=["sd14", "sd21", "empty"])
def test_config_from_diffusers(cfg):
    sched = DDIMScheduler(**config_from_diffusers(cfg))
    ref = TorchDDIM.from_config(cfg)
    for key, value in sched.get_config().items():
        if key != "eta":
            assert value == ref.config[key], key
    ref.set_timesteps(25)
    np.testing.assert_array_equal(sched.schedule(25)["timesteps"], ref.timesteps.numpy())
    assert sched.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod))


@pytest.mark.parametrize("key", ["trained_betas", "thresholding", "rescale_betas_zero_snr"])
def test_config_from_diffusers_refuses_unsupported(key):
    value = [0.1] * 10 if key == "trained_betas" else True
    with pytest.raises(ValueError, match=key):
        config_from_diffusers({**SD14_CONFIG, key: value})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(prediction_type="x0"), "prediction_type"),
        (dict(timestep_spacing="even"), "timestep_spacing"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
        (dict(beta_start=0.0), "beta_start"),
        (dict(beta_end=1.5), "beta_end"),
        (dict(steps_offset=-1), "steps_offset"),
        (dict(eta=-0.1), "eta"),
        (dict(clip_sample="yes"), "clip_sample"),
        (dict(set_alpha_to_one=None), "set_alpha_to_one"),
        (dict(clip_sample_range=0.0), "clip_sample_range"),
    ],
)
def test_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DDIMScheduler(**kwargs)


@pytest.mark.parametrize(
    "num_steps, strength, name",
    [
        (0, 1.0, "num_steps"),
        (1001, 1.0, "num_steps"),
        (10.0, 1.0, "num_steps"),
        (True, 1.0, "num_steps"),
        (10, 0.0, "strength"),
        (10, 1.5, "strength"),
        (10, "0.5", "strength"),
        (10, 0.05, "strength"),
    ],
)
def test_bad_schedule_arguments(num_steps, strength, name):
    with pytest.raises(ValueError, match=name):
        DDIMScheduler().schedule(num_steps, strength=strength)


def test_steps_offset_past_last_timestep_raises():
    with pytest.raises(ValueError, match="num_steps"):
        DDIMScheduler(steps_offset=1).schedule(1000)


def test_step_without_noise_raises_when_stochastic():
    assert not DDIMScheduler().needs_step_noise
    sched = DDIMScheduler(eta=0.5)
    assert sched.needs_step_noise
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(sched, x, x, 0, sched.schedule(10))
