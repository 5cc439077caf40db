"""Converting checkpoint tensors ahead of the models (`weights.prefetch`): the layout
guesses against `state_dict.torch_layout` on full-size key sets, values against
`streaming.to_keras_tensor`, and the worker's budget, order and shutdown."""

import threading

import keras
import numpy as np
import pytest

from keras_sd import presets
from keras_sd.weights import checkpoint, prefetch, streaming
from keras_sd.weights.compvis import compvis_to_diffusers, diffusers_to_compvis
from keras_sd.weights.state_dict import match_state_dict, torch_layout


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_layout_guesses_hold_for_every_full_size_weight(version):
    # Full-size models built deferred cost no memory; the keys and shapes are those of a
    # real single file (through the CompVis layout: 1x1 conv VAE attention, OpenCLIP).
    models = streaming.build_models_deferred(presets.resolve_model_config(version))
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
        streaming.forget_deferred(models.values())


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
        expected = streaming.to_keras_tensor(state[key], variable)
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
