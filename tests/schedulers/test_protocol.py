"""The scheduler protocol: a multistep solver defined here runs in the compiled loop.

`AdamsBashforthDDIM` keeps the previous model output in its state and applies the
two-step Adams-Bashforth combination 1.5 * eps_i - 0.5 * eps_{i-1} (the first step
uses eps_0 alone) before a deterministic DDIM update, the idea behind PLMS (Liu et
al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", eq. 12 with
two terms). The test compares the sampler's compiled loop with a plain numpy loop of
the same update around the same UNet.

The JAX test reads `compare()` as run in the session's shared JAX child
(tests/backend_children.py).
"""

import keras
import numpy as np
import pytest
from keras import ops

from backend_children import JAX_GROUP, jax_results, random_tiny_sd, task_result  # noqa: F401
from keras_sd import DDIMScheduler, StableDiffusion, backend
from keras_sd.schedulers.base import take_step_constant

NUM_STEPS = 4


class AdamsBashforthDDIM(DDIMScheduler):
    """DDIM with a two-step Adams-Bashforth combination of the model outputs.

    Args:
        current_weight: weight of the current output (1.5 for Adams-Bashforth 2);
            the previous output gets 1 - current_weight.
        **kwargs: DDIM's arguments.
    """

    def __init__(self, current_weight: float = 1.5, **kwargs):
        super().__init__(**kwargs)
        self.current_weight = float(current_weight)

    def init_state(self, sample, schedule):
        sample = ops.cast(sample, "float32")
        return {
            "sample": sample,
            "previous": ops.zeros_like(sample),
            "count": ops.zeros((), "int32"),
        }

    def step(self, state, model_output, index, schedule, noise=None):
        eps = ops.cast(model_output, "float32")
        mixed = self.current_weight * eps + (1.0 - self.current_weight) * state["previous"]
        combined = ops.where(state["count"] > 0, mixed, eps)
        a_t = take_step_constant(schedule, "alpha_prod_t", index)
        a_prev = take_step_constant(schedule, "alpha_prod_t_prev", index)
        x = state["sample"]
        x0 = (x - ops.sqrt(1.0 - a_t) * combined) / ops.sqrt(a_t)
        sample = ops.sqrt(a_prev) * x0 + ops.sqrt(1.0 - a_prev) * combined
        return {"sample": sample, "previous": eps, "count": state["count"] + 1}


def unet_function(sd):
    """The UNet as a function of arrays; on JAX compiled once, since there each eager
    op compiles a program of its own per shape."""
    if keras.backend.backend() != "jax":
        return sd.diffusion_model
    program = backend.compile_function(backend.stateless(sd.diffusion_model))
    state = backend.model_state(sd.diffusion_model)
    return lambda *args: program(state, *args)


def numpy_loop(unet, scheduler, latents, context, num_steps):
    """The same update, one UNet call and numpy arithmetic per step."""
    tables = scheduler.schedule(num_steps)
    x, previous = latents.astype(np.float64), None
    for i, t in enumerate(tables["timesteps"]):
        timesteps = np.full((x.shape[0],), t, np.int32)
        eps = ops.convert_to_numpy(unet(x.astype(np.float32), timesteps, context))
        eps = eps.astype(np.float64)
        w = scheduler.current_weight
        combined = eps if previous is None else w * eps + (1.0 - w) * previous
        a_t, a_prev = (float(tables[k][i]) for k in ("alpha_prod_t", "alpha_prod_t_prev"))
        x0 = (x - np.sqrt(1.0 - a_t) * combined) / np.sqrt(a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * combined
        previous = eps
    return x


def compare(jit_compile=True) -> dict:
    sd = random_tiny_sd(32, 32, jit_compile=jit_compile)
    latents = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    context = sd.encode_text(["a red circle", "a blue square"])
    scheduler = AdamsBashforthDDIM()
    ours = sd.sampler(scheduler, latents, context, guidance_scale=1.0, num_steps=NUM_STEPS)
    unet = unet_function(sd)
    expected = numpy_loop(unet, scheduler, latents, context, NUM_STEPS)
    # Weight 1 ignores the carried output: DDIM with eta 0, DDIMScheduler()'s update.
    plain = numpy_loop(unet, AdamsBashforthDDIM(current_weight=1.0), latents, context, NUM_STEPS)
    return {
        "error": float(np.abs(ops.convert_to_numpy(ours) - expected).max()),
        "scale": float(np.abs(expected).max()),
        "differs_from_ddim": float(np.abs(plain - expected).max()),
    }


def check(result: dict) -> None:
    assert result["error"] <= 1e-5 * max(1.0, result["scale"]), result
    assert result["differs_from_ddim"] > 1e-3, result  # the state really changed the update


@pytest.mark.parametrize("jit_compile", [False, True])
def test_multistep_state_runs_in_the_compiled_loop(jit_compile):
    check(compare(jit_compile))


@pytest.mark.xdist_group(JAX_GROUP)
def test_multistep_state_runs_in_the_compiled_loop_on_jax(jax_results):  # noqa: F811
    assert jax_results["backend"] == "jax"
    check(task_result(jax_results, "protocol"))


def test_own_parameter_is_part_of_the_program_key(fresh_programs):
    sd = StableDiffusion(32, 32, jit_compile=True, config="tiny")
    latents = np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)
    context = sd.encode_text("a red circle")
    run = lambda s: ops.convert_to_numpy(  # noqa: E731
        sd.sampler(s, latents, context, guidance_scale=1.0, num_steps=NUM_STEPS)
    )
    first = run(AdamsBashforthDDIM(current_weight=1.5))
    assert sd.sampler.trace_count == 1
    np.testing.assert_array_equal(run(AdamsBashforthDDIM(current_weight=1.5)), first)
    assert sd.sampler.trace_count == 1
    changed = run(AdamsBashforthDDIM(current_weight=2.0))
    assert sd.sampler.trace_count == 2
    assert np.abs(changed - first).max() > 1e-4
    assert AdamsBashforthDDIM(current_weight=2.0).get_config()["current_weight"] == 2.0


def test_get_config_refuses_an_unstored_argument():
    class Forgetful(DDIMScheduler):
        def __init__(self, strength_of_thing: float = 1.0, **kwargs):
            super().__init__(**kwargs)

    with pytest.raises(TypeError, match="strength_of_thing"):
        Forgetful().get_config()
