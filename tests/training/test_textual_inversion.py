"""TextualInversionTrainer: only the new rows train (TF, JAX, PyTorch; float32, mixed_float16,
mixed_bfloat16), the rows start from the initializer, multi-vector prompts, the dataset.

The JAX test reads `train_and_compare("float32")` as run in the session's shared JAX
child (tests/backend_children.py).
"""

import keras
import numpy as np
import pytest
from PIL import Image

from backend_children import JAX_GROUP, jax_results, random_tiny_sd, task_result  # noqa: F401
from keras_sd import StableDiffusion
from keras_sd.training import TextualInversionTrainer, textual_inversion_dataset

TABLE = "embeddings-token_embedding/embeddings"


def tiny_sd():
    keras.utils.set_random_seed(0)  # the training's noise and timesteps
    return random_tiny_sd(64, 64, jit_compile=False)


def weights_of(sd) -> dict:
    parts = (sd.text_encoder, sd.diffusion_model, sd.image_encoder, sd.decoder)
    return {w.path: np.array(keras.ops.convert_to_numpy(w)) for m in parts for w in m.weights}


def random_images(n=3, height=72, width=64, seed=0):
    rng = np.random.default_rng(seed)
    return list((rng.random((n, height, width, 3)) * 255).astype("uint8"))


def train_and_compare(policy: str, run_eagerly=False, jit_compile=False) -> dict:
    """Train a 2-vector token for 2 steps under `policy`; which weights changed."""
    keras.config.set_dtype_policy(policy)
    try:
        sd = tiny_sd()
        before = weights_of(sd)
        trainer = TextualInversionTrainer(sd, "<s1>", initializer_token="circle", num_vectors=2)
        trainer.compile(
            optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit_compile, run_eagerly=run_eagerly
        )
        data = textual_inversion_dataset(
            random_images(), "<s1>", sd.tokenizer, size=32, repeats=2, batch_size=3
        )
        history = trainer.fit(data, epochs=1, verbose=0)
        after = weights_of(sd)
    finally:
        keras.config.set_dtype_policy("float32")
    ids = sd.tokenizer.encode("<s1>")[1:-1]
    table = next(k for k in after if k.endswith(TABLE))
    old_rows = len(before[table])
    new_rows = after[table][old_rows:]
    circle = before[table][sd.tokenizer.encode("circle")[1]]
    changed = [
        k
        for k in before
        if k != table and (before[k].shape != after[k].shape or (before[k] != after[k]).any())
    ]
    return {
        "ids": ids,
        "old_rows": old_rows,
        "changed": changed,
        "table_rows_kept": bool((after[table][:old_rows] == before[table]).all()),
        "row_change": float(np.abs(new_rows - circle).max()),
        "rows_finite": bool(np.isfinite(new_rows).all()),
        "learned_equals_table": bool((trainer.embedding == new_rows).all()),
        "loss": [float(v) for v in history.history["loss"]],
        "loss_scaled": type(trainer.optimizer).__name__ == "LossScaleOptimizer",
    }


def check_result(result, policy):
    assert result["ids"] == [result["old_rows"], result["old_rows"] + 1]
    assert result["changed"] == [], result["changed"]
    assert result["table_rows_kept"]
    assert result["rows_finite"] and np.isfinite(result["loss"]).all()
    assert result["row_change"] > 1e-3  # the new rows did train
    assert result["learned_equals_table"]
    assert result["loss_scaled"] == (policy == "mixed_float16")


def test_only_the_new_rows_change():
    check_result(train_and_compare("float32"), "float32")


# Eager steps: tracing the tiny model's graph costs more than the steps themselves.
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_only_the_new_rows_change_in_mixed_precision(policy):
    check_result(train_and_compare(policy, run_eagerly=True), policy)


@pytest.mark.xdist_group(JAX_GROUP)
def test_only_the_new_rows_change_on_jax(jax_results):  # noqa: F811
    assert jax_results["backend"] == "jax"
    check_result(task_result(jax_results, "textual_inversion"), "float32")


def test_new_rows_start_from_the_initializer_and_read_like_the_table():
    sd = tiny_sd()
    table = next(v for k, v in weights_of(sd).items() if k.endswith(TABLE))
    trainer = TextualInversionTrainer(sd, "<s1>", initializer_token="circle", num_vectors=3)
    rows = trainer.embedding
    np.testing.assert_array_equal(rows, np.repeat(table[[sd.tokenizer.encode("circle")[1]]], 3, 0))
    ids = sd.tokenizer(["a red <s1> on a blue background"])
    assert list(ids[0, 3:6]) == sd.tokenizer.encode("<s1>")[1:-1]
    # Perturbed rows through the trainer's encoder equal the same rows written into the table.
    trainer.text_encoder.rows.assign(rows + np.arange(3, dtype="float32")[:, None])
    through_trainer = keras.ops.convert_to_numpy(trainer.text_encoder(ids))
    trainer.apply_embedding()
    through_pipeline = keras.ops.convert_to_numpy(sd.encode_text("a red <s1> on a blue background"))
    np.testing.assert_allclose(through_trainer, through_pipeline, atol=1e-5)
    assert (
        np.abs(through_pipeline - keras.ops.convert_to_numpy(sd.encode_text("a red circle"))).max()
        > 0.1
    )


def test_seeded_start_without_initializer():
    a, b = tiny_sd(), tiny_sd()
    a.add_tokens("<x>", seed=3)
    b.add_tokens("<x>", seed=3)
    np.testing.assert_array_equal(a.token_vectors("<x>"), b.token_vectors("<x>"))
    table = a._token_table()[:-1]
    assert abs(a.token_vectors("<x>").std() - table.std()) < 0.5 * table.std()


def test_dataset_crops_flips_and_captions(tmp_path):
    sd = tiny_sd()
    sd.add_tokens("<s1>", initializer_token="circle")
    gradient = np.zeros((64, 96, 3), np.uint8)
    gradient[..., 0] = np.arange(96, dtype=np.uint8)[None] * 2  # red grows left to right
    Image.fromarray(gradient).save(tmp_path / "a.png")
    Image.fromarray(gradient[:32, :48]).save(tmp_path / "b.jpg")  # another size: resized
    (tmp_path / "notes.txt").write_text("not an image")
    data = textual_inversion_dataset(
        tmp_path, "<s1>", sd.tokenizer, size=32, repeats=3, batch_size=4, flip=True, seed=1
    )
    assert len(data) == 2  # 2 images x 3 repeats in batches of 4
    batches = [data[0], data[1]]
    images = np.concatenate([b["images"] for b in batches])
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.float32
    assert -1.0 <= images.min() and images.max() <= 1.0
    # A centre crop of the gradient: red rises or (flipped) falls across the window.
    slopes = np.sign(images[:, 16, -1, 0] - images[:, 16, 0, 0])
    assert set(slopes) == {-1.0, 1.0}, slopes  # both orientations appear with this seed
    token_id = sd.tokenizer.encode("<s1>")[1]
    ids = np.concatenate([b["token_ids"] for b in batches])
    assert ids.shape == (6, 77) and ((ids == token_id).sum(axis=1) == 1).all()
    data.on_epoch_end()
    assert not np.array_equal(data[0]["token_ids"], batches[0]["token_ids"]) or not np.array_equal(
        data[0]["images"], batches[0]["images"]
    )


def test_bad_inputs_give_clear_errors(tmp_path):
    sd = tiny_sd()
    with pytest.raises(ValueError, match="whitespace"):
        sd.add_tokens("<my thing>", initializer_token="toy")
    with pytest.raises(ValueError, match="num_vectors"):
        sd.add_tokens("<x>", initializer_token="toy", num_vectors=0)
    with pytest.raises(ValueError, match=r"one vocabulary token; it is 2 tokens \[.red., .car.\]"):
        sd.add_tokens("<x>", initializer_token="red car")
    with pytest.raises(ValueError, match="already in the vocabulary"):
        sd.add_tokens("cat", initializer_token="toy")
    assert sd.tokenizer.added_tokens == [] and sd.text_encoder.vocab_size == 49408
    assert sd.add_tokens("zzkyrq", initializer_token="toy") == [49408]  # no angle brackets: allowed
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        textual_inversion_dataset(empty, "zzkyrq", sd.tokenizer, size=32)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        textual_inversion_dataset(tmp_path, "zzkyrq", sd.tokenizer, size=32)
    with pytest.raises(ValueError, match="not in the tokenizer"):
        textual_inversion_dataset(random_images(), "<other>", sd.tokenizer, size=32)
    with pytest.raises(ValueError, match="crop"):
        textual_inversion_dataset(random_images(), "zzkyrq", sd.tokenizer, crop="middle")


def test_cli_train_ti_then_generate_with_the_embedding(tmp_path, capsys):
    from keras_sd import cli
    from keras_sd.shapes.dataset import Combination, render

    folder = tmp_path / "stars"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(render(Combination("star", "yellow", "black"), 64, rng)).save(
            folder / f"{i}.png"
        )
    out = tmp_path / "learned_embeds.safetensors"
    argv = ["train-ti", str(folder), "--token", "<s1>", "--init-token", "circle"]
    assert cli.main([*argv, "--steps", "2", "--batch-size", "3", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    from keras_sd.weights.embeddings import read_embedding

    token, vectors = read_embedding(out)
    assert token == "<s1>" and vectors.shape == (1, 64) and np.isfinite(vectors).all()
    image = tmp_path / "star.png"
    prompt = "a red <s1> on a blue background"
    argv = ["generate", prompt, "--embedding", str(out), "--steps", "2", "-o", str(image)]
    argv.append("--no-compile-cache")  # this process has made tensors already
    assert cli.main(argv) == 0
    assert np.asarray(Image.open(image)).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--token", "<my thing>"], "whitespace"),
        (["--token", "<x>", "--init-token", "red car"], "one vocabulary token"),
        (["--token", "<x>", "-o", "out.bin"], "must end in .safetensors"),
        (["--token", "<x>", "--num-vectors", "0"], "must be positive"),
    ],
)
def test_cli_train_ti_bad_arguments(tmp_path, capsys, argv, needle):
    from keras_sd import cli

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    try:
        status = cli.main(["train-ti", str(folder), *argv])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    assert status == 2
    assert needle in capsys.readouterr().err


def test_cli_train_ti_empty_folder(tmp_path, capsys):
    from keras_sd import cli

    assert cli.main(["train-ti", str(tmp_path), "--token", "<x>"]) == 2
    assert "holds no images" in capsys.readouterr().err


COLOUR_PAIRS = [("red", "blue"), ("green", "white"), ("white", "red"), ("blue", "yellow")]


def star_and_colour_rates(sd, seeds=20, num_steps=10):
    """Shares of "a {colour} <s1> on a {background} background" images that the checker
    reads as a star, and as the prompt's two colours."""
    from keras_sd.shapes import checker

    stars = colours = 0
    for colour, background in COLOUR_PAIRS:
        prompt = f"a {colour} <s1> on a {background} background"
        images = sd.text_to_image(
            prompt, batch_size=seeds, num_steps=num_steps, seed=0, progress=False
        )
        for image in images:
            reading = checker.read(image)
            stars += reading.shape == "star"
            colours += (reading.color, reading.background) == (colour, background)
    count = seeds * len(COLOUR_PAIRS)
    return stars / count, colours / count


def test_learns_a_star_on_tiny_shapes():
    """The issue's concept test: 5 renders of a yellow star, "<s1>" from "circle"."""
    from keras_sd.shapes.dataset import Combination, render

    sd = StableDiffusion.from_preset("tiny-shapes")
    rng = np.random.default_rng(0)
    stars = [render(Combination("star", "yellow", "black"), 64, rng) for _ in range(5)]
    trainer = TextualInversionTrainer(sd, "<s1>", initializer_token="circle", seed=0)
    star_before, _ = star_and_colour_rates(sd)
    data = textual_inversion_dataset(
        stars,
        "<s1>",
        sd.tokenizer,
        templates=("a yellow {} on a black background",),
        size=64,
        repeats=100,
        batch_size=5,
    )
    trainer.compile(optimizer=keras.optimizers.Adam(2e-2))  # 100 steps of batch 5
    trainer.fit(data, epochs=1, verbose=0)
    star_after, colour_after = star_and_colour_rates(sd)
    assert star_before <= 0.2, star_before
    assert star_after >= 0.7, star_after
    assert colour_after >= 0.7, colour_after


def test_adding_a_token_refreshes_only_the_text_encoder_program():
    sd = tiny_sd()
    sd.text_to_image("a red circle", num_steps=2, seed=0, progress=False)
    programs = dict(sd._compiled)
    assert {"text_encoder", "sampler", "decoder"} <= set(programs)
    sd.add_tokens("<s1>", initializer_token="circle")
    assert "text_encoder" not in sd._compiled
    for role in ("sampler", "decoder"):
        assert sd._compiled[role] is programs[role]
    same = sd.encode_text("a red <s1>")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(same), keras.ops.convert_to_numpy(sd.encode_text("a red circle"))
    )


def test_keras_layout_checkpoint_keeps_added_tokens(tmp_path):
    sd = tiny_sd()
    sd.add_tokens("<s1>", initializer_token="circle", num_vectors=2)
    sd.set_token_vectors("<s1>", np.arange(64, dtype="float32").reshape(2, 32))
    sd.save_checkpoint(tmp_path / "model.safetensors", layout="keras")
    back = StableDiffusion.from_checkpoint(tmp_path / "model.safetensors", jit_compile=False)
    assert back.tokenizer.encode("<s1>") == sd.tokenizer.encode("<s1>")
    np.testing.assert_array_equal(back.token_vectors("<s1>"), sd.token_vectors("<s1>"))
