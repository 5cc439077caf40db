"""Component replacement and the token-id check on JAX.

tests/test_construction.py runs on the suite's backend (TensorFlow). JAX is where an
out-of-range token id fails silently (its gather clamps the index instead of raising),
and where a replaced component would be missed if a compiled program kept the old
one, so the same tests run again through pytest inside the session's shared JAX child
(tests/backend_children.py, CONSTRUCTION_TESTS).
"""

import pytest

from backend_children import JAX_GROUP, jax_results, task_result  # noqa: F401


@pytest.mark.xdist_group(JAX_GROUP)
def test_replacement_and_token_check_on_jax(jax_results):  # noqa: F811
    assert jax_results["backend"] == "jax"
    run = task_result(jax_results, "construction")
    calls = [outcome for _, when, outcome in run["outcomes"] if when == "call"]
    # Five tests (the encoder/decoder one is parametrized twice), all run and passed.
    assert run["status"] == 0 and calls == ["passed"] * 5, run
