"""Converting checkpoint tensors ahead of the models (`weights.prefetch`): the layout
guesses against `state_dict.torch_layout` on full-size key sets, values against
`transpose.to_keras_tensor` and numpy's transpose, the worker's budget, order and
shutdown, and on TensorFlow and JAX CPUs that loaded variables live in the arena (their
buffer addresses) and give it back when they go."""

import gc
import threading

import keras
import numpy as np
import pytest

from conftest import tensorflow_buffer_address
from keras_sd import StableDiffusion, presets
from keras_sd.backend import has_accelerator
from keras_sd.weights import checkpoint, deferred, prefetch, safetensors_io, transpose
from keras_sd.weights.compvis import compvis_to_diffusers, diffusers_to_compvis
from keras_sd.weights.state_dict import match_state_dict, torch_layout


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_layout_guesses_hold_for_every_full_size_weight(version):
    # Full-size models built deferred cost no memory; the keys and shapes are those of a
    # real single file (through the CompVis layout: 1x1 conv VAE attention, OpenCLIP).
    models = deferred.build_models_deferred(presets.resolve_model_config(version))
    try:
        parts = checkpoint.export_parts_lazy(models)
        parts = compvis_to_diffusers(diffusers_to_compvis(parts, version))
        checked = 0
        for attr, state, prefix, ignore in checkpoint.component_states(parts):
            keys = {id(tensor): key for key, tensor in state.items()}
            pairs, problems = match_state_dict(models[attr], state, prefix, ignore)
            assert not problems
            for variable, tensor in pairs:
                guessed = prefetch.guess_layout(keys[id(tensor)], tensor.shape)
                actual = torch_layout(tensor.shape, variable)
                assert prefetch._same_values(guessed, actual), (keys[id(tensor)], actual)
                checked += 1
        assert checked == sum(len(m.weights) for m in models.values())
    finally:
        deferred.forget_deferred(models.values())


class _Counted:
    """A lazy tensor that records when its values are read."""

    def __init__(self, array, reads):
        self.array, self.reads = array, reads
        self.shape, self.dtype = array.shape, array.dtype

    def __array__(self, dtype=None, copy=None):
        self.reads.append(id(self))
        return np.asarray(self.array, dtype=dtype)


def _dense_and_table():
    dense = keras.layers.Dense(4)
    dense.build((None, 3))
    table = keras.layers.Embedding(5, 2)
    table.build((None,))
    rng = np.random.default_rng(0)
    return dense, table, rng.standard_normal((4, 3)), rng.standard_normal((5, 2))


def test_values_match_direct_conversion_even_when_the_guess_is_wrong():
    dense, table, weight, embeddings = _dense_and_table()
    reads = []
    # "a.weight" is guessed to be a linear layer's; it is an embedding table here.
    # "c.weight", a 1x1 conv weight [O, I, 1, 1], is guessed to be a conv's; transposed
    # to [1, 1, I, O] it holds the Dense kernel's values, so it is not read again.
    state = {
        "a.weight": _Counted(embeddings, reads),
        "b.weight": _Counted(weight, reads),
        "c.weight": _Counted(weight[:, :, None, None], reads),
    }
    targets = {"a.weight": table.embeddings, "b.weight": dense.kernel, "c.weight": dense.kernel}
    with prefetch.Prefetch([(state, "", ())], "float32") as ahead:
        got = {key: ahead.take(state[key], variable) for key, variable in targets.items()}
    for key, variable in targets.items():
        expected = transpose.to_keras_tensor(state[key], variable)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(got[key]), keras.ops.convert_to_numpy(expected)
        )
        assert keras.backend.standardize_dtype(got[key].dtype) == "float32"
    # Each direct conversion above read once more; the wrong guess also twice before.
    assert [reads.count(id(state[key])) for key in targets] == [3, 2, 2]


def _take_in_time(ahead, tensor, variable):
    result = {}
    worker = threading.Thread(target=lambda: result.update(value=ahead.take(tensor, variable)))
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "take() deadlocked"
    return keras.ops.convert_to_numpy(result["value"])


def test_budget_bounds_work_ahead_and_out_of_order_takes_do_not_deadlock():
    dense, _, weight, _ = _dense_and_table()
    reads = []
    state = {f"w{i}.weight": _Counted(weight + i, reads) for i in range(4)}
    ahead = prefetch.Prefetch([(state, "", ())], "float32", budget=1)
    try:
        ahead._jobs[id(state["w0.weight"])][2].result(timeout=30)
        threading.Event().wait(0.3)  # time for the worker to run on if it were allowed
        assert len(reads) == 1  # one tensor converted: the budget is spent
        # w3 is queued behind w1, which waits for budget that only taking w0 returns;
        # then w1 itself, still waiting: each take must get its tensor regardless.
        np.testing.assert_allclose(
            _take_in_time(ahead, state["w3.weight"], dense.kernel), (weight + 3).T
        )
        np.testing.assert_allclose(
            _take_in_time(ahead, state["w1.weight"], dense.kernel), (weight + 1).T
        )
    finally:
        ahead.close()  # returns although w2 still waits for budget
    assert not ahead._jobs


def test_conversion_errors_reach_the_caller():
    dense, _, weight, _ = _dense_and_table()

    class Broken:
        shape, dtype = weight.shape, weight.dtype

        def __array__(self, dtype=None, copy=None):
            raise ValueError("cannot read a.safetensors: a tensor is cut short")

    state = {"w.weight": Broken()}
    with prefetch.Prefetch([(state, "", ())], "float32") as ahead:
        with pytest.raises(ValueError, match="cut short"):
            ahead.take(state["w.weight"], dense.kernel)


@pytest.mark.parametrize(
    "shape, permutation",
    [
        ((130, 7), (1, 0)),  # two full blocks of rows and a partial one
        ((130, 7, 3, 3), (2, 3, 1, 0)),
        ((5, 130, 1, 1), (2, 3, 1, 0)),
        ((4, 6, 5), (2, 0, 1)),  # any other permutation
        ((3, 4), None),
    ],
)
def test_transpose_into_matches_numpy_and_casts_to_the_output_dtype(shape, permutation):
    source = np.random.default_rng(0).standard_normal(shape).astype("float16")
    expected = source if permutation is None else source.transpose(permutation)
    out = np.full(expected.shape, np.nan, "float32")
    transpose.transpose_into(source, out, permutation)
    np.testing.assert_array_equal(out, expected.astype("float32"))


def test_mapped_values_equal_read_values_and_slices_fall_back(tmp_path):
    array = np.random.default_rng(0).standard_normal((3, 5)).astype("float32")
    path = tmp_path / "w.safetensors"
    # A first tensor of odd size puts the second at an offset that is not page-aligned.
    safetensors_io.write_safetensors(path, {"a": np.ones(3, "float16"), "w": array})
    tensors, _ = safetensors_io.read_safetensors(path)
    assert tensors["w"].file_offset % 4096 != 0
    with tensors["w"].mapped() as values:
        np.testing.assert_array_equal(values, array)
        assert not values.flags.writeable  # the file's own bytes: never written to
    with tensors["w"][1:].mapped() as values:  # a slice has no offset of its own
        np.testing.assert_array_equal(values, array[1:])


ADOPTING = keras.backend.backend() in ("tensorflow", "jax") and not has_accelerator()


def _buffer_address(variable) -> int:
    if keras.backend.backend() == "jax":
        return variable.value.unsafe_buffer_pointer()
    return tensorflow_buffer_address(variable)


@pytest.mark.skipif(not ADOPTING, reason="variables adopt host memory on TF/JAX CPUs only")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_loaded_variables_live_in_the_arena_and_free_it_with_the_model(
    tmp_path, monkeypatch, dtype
):
    sd = StableDiffusion(32, 32, jit_compile=False, config="tiny")
    rng = np.random.default_rng(0)
    for model in (sd.text_encoder, sd.diffusion_model, sd.decoder, sd.image_encoder):
        for variable in model.weights:
            variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    path = tmp_path / "tiny.safetensors"
    checkpoint.save_checkpoint(sd, path, dtype=dtype)
    arenas = []

    def recorded(nbytes):
        arena = make_arena(nbytes)
        arenas.append((np.frombuffer(arena, np.uint8).ctypes.data, len(arena)))
        return arena

    make_arena = prefetch._anonymous_memory
    monkeypatch.setattr(prefetch, "_anonymous_memory", recorded)
    loaded = StableDiffusion.from_checkpoint(path, config="tiny", jit_compile=False)
    (begin, size), outside = arenas[0], []
    for attr in ("text_encoder", "diffusion_model", "decoder", "image_encoder"):
        for ours, theirs in zip(
            getattr(loaded, attr).weights, getattr(sd, attr).weights, strict=True
        ):
            expected = keras.ops.convert_to_numpy(theirs.value).astype(dtype).astype("float32")
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours.value), expected)
            if not begin <= _buffer_address(ours) < begin + size:
                outside.append(ours.path)
    assert not outside, outside
    del loaded, ours
    gc.collect()
    with open("/proc/self/maps") as maps:
        starts = {int(line.split("-")[0], 16) for line in maps}
    assert begin - begin % 4096 not in starts  # unmapped once no variable uses it
