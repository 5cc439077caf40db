"""Careless inputs, generated: every public entry point refuses bad values with a
`ValueError`/`TypeError` that names the argument, before any model runs (the tests make
a model run fail); NaN/inf never becomes an image; long prompts encode fast; a run too
large for the machine is refused with an estimate of its memory."""

import math
import string
import time
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_sd import StableDiffusion, arguments, cli, presets
from keras_sd.models.validation import REQUIRED, SPECS
from keras_sd.sampling import Sampler
from keras_sd.schedulers import scheduler_names

EXAMPLES = 300  # generated bad values per entry point
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same values every CI run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NAN, INF = float("nan"), float("inf")
SIZE = 32  # the tiny model's default size; its sides must be multiples of 4
LATENTS = (1, SIZE // 2, SIZE // 2, 4)

# ----------------------------------------------------------------------- bad values
NOT_INT = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.complex_numbers(),
)
NOT_NUMBER = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.floats()))
NOT_FLAG = st.one_of(st.none(), st.integers(), st.text(max_size=4), st.floats())
BAD_PROMPT = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.binary(max_size=4),
    st.just([]),
    st.lists(st.text(max_size=4), max_size=2).map(lambda texts: [*texts, 3]),
    st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2),
)
BAD_SIDE = st.one_of(
    NOT_INT.filter(lambda v: v is not None),
    st.integers().filter(lambda v: v <= 0 or v % 4 or v > arguments.MAX_SIDE),
)
BAD_SCHEDULER = st.one_of(
    st.text(max_size=8).filter(lambda name: name not in scheduler_names()),
    st.integers(),
    st.floats(),
    st.lists(st.text(max_size=2), max_size=2),
)


def bad_noise(shape):
    """Arrays of other shapes, non-finite values, integer arrays, non-arrays."""
    other_shapes = st.lists(st.integers(0, 18), max_size=5).map(tuple)
    other_shapes = other_shapes.filter(lambda s: s not in (shape, shape[1:]))

    def with_value(value):
        noise = np.zeros(shape, np.float32)
        noise.flat[7] = value
        return noise

    return st.one_of(
        other_shapes.map(lambda s: np.zeros(s, np.float32)),
        st.sampled_from([NAN, INF, -INF]).map(with_value),
        st.just(np.zeros(shape, np.int32)),
        st.text(max_size=4),
        st.lists(st.text(max_size=2), min_size=1, max_size=3),
    )


SAMPLING = {
    "negative_prompt": BAD_PROMPT.filter(lambda v: v is not None),
    "batch_size": st.one_of(NOT_INT, st.integers(max_value=0), st.integers(10**6, 10**30)),
    "num_steps": st.one_of(NOT_INT, st.integers(max_value=0), st.integers(1000, 10**12)),
    "unconditional_guidance_scale": st.one_of(
        NOT_NUMBER,
        st.sampled_from([NAN, INF, -INF, 1e30, -1e30]),
        st.floats(max_value=0.0, exclude_max=True),
        st.floats(min_value=arguments.MAX_GUIDANCE, exclude_min=True),
    ),
    "seed": st.one_of(
        NOT_INT.filter(lambda v: v is not None),
        st.integers(max_value=-1),
        st.integers(min_value=arguments.MAX_SEED + 1),
    ),
    "scheduler": BAD_SCHEDULER,
    "progress": NOT_FLAG,
    "diffusion_noise": bad_noise(LATENTS),
}


def one_bad(table: dict):
    """(argument name, bad value) for one argument of `table`, or an unknown keyword."""
    unknown = st.text(string.ascii_lowercase, min_size=3, max_size=8).filter(
        lambda name: name not in KNOWN
    )
    return st.one_of(
        *(st.tuples(st.just(name), values) for name, values in table.items()),
        st.tuples(unknown, st.just(1)),
    )


KNOWN = {"prompt", "image", "mask", "extend", "strength", "value_range", "resize", "path"}
KNOWN |= {"config", "jit_compile", "tokenizer", "decoder"}
KNOWN |= {"keep_unmasked", "width", "height", "encoded_text", *SAMPLING}


def refuses(call, name, value, kwargs) -> str:
    """Call with `kwargs[name] = value`; the error must name `name` (or, for an unknown
    keyword, say so)."""
    kwargs = {**kwargs, name: value}
    if name == "diffusion_noise":
        kwargs["seed"] = None
    with pytest.raises((ValueError, TypeError)) as error:
        call(**kwargs)
    message = str(error.value)
    expected = name if name in KNOWN else "unexpected keyword"
    assert expected in message, (name, value, message)
    return message


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion(SIZE, SIZE, config="tiny", jit_compile=False)


@pytest.fixture
def no_model(monkeypatch):
    """A model call or build fails the test: the arguments must be checked first."""

    def ran(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    monkeypatch.setattr(StableDiffusion, "_stateless_program", ran)
    monkeypatch.setattr(Sampler, "__call__", ran)
    for name in ("CLIPTokenizer", "CLIPTextEncoder", "UNet", "VAEDecoder", "VAEEncoder"):
        monkeypatch.setattr(f"keras_sd.pipeline.{name}", ran)
    monkeypatch.setattr("keras_sd.pipeline.checkpoint.checkpoint_kwargs", ran)
    monkeypatch.setattr(cli, "_load_model", ran)
    monkeypatch.setattr("keras_sd.conversion.convert", ran)


def run_generated(entry: str, strategy, check) -> None:
    count = []

    @SETTINGS
    @given(strategy)
    def each(drawn):
        count.append(1)
        check(*drawn)

    each()
    print(f"{entry}: {len(count)} generated bad values refused")
    assert len(count) >= EXAMPLES


# ------------------------------------------------------------------- entry points
BASE = {"num_steps": 2, "seed": 0, "progress": False}


def test_text_to_image(sd, no_model):
    table = {
        **SAMPLING,
        "prompt": BAD_PROMPT,
        "width": BAD_SIDE,
        "height": BAD_SIDE,
        "negative_prompt": st.one_of(SAMPLING["negative_prompt"], st.just(["a", "b"])),
    }
    kwargs = {**BASE, "prompt": "a red circle"}
    run_generated(
        "text_to_image", one_bad(table), lambda n, v: refuses(sd.text_to_image, n, v, kwargs)
    )


def test_generate_image(sd, no_model):
    def bad_text(shape):
        wrong = st.lists(st.integers(0, 80), min_size=1, max_size=4).map(tuple)
        wrong = wrong.filter(lambda s: s not in (shape, shape[1:]))
        return st.one_of(wrong.map(lambda s: np.ones(s, np.float32)), bad_noise(shape))

    table = {
        **SAMPLING,
        "encoded_text": bad_text((1, 77, 32)),
        "width": BAD_SIDE,
        "height": BAD_SIDE,
    }
    kwargs = {**BASE, "encoded_text": np.zeros((1, 77, 32), np.float32)}
    run_generated(
        "generate_image", one_bad(table), lambda n, v: refuses(sd.generate_image, n, v, kwargs)
    )


def bad_images(shape, floats_valid=False):
    float_without_range = np.zeros(shape, np.float32)
    return st.one_of(
        st.none(),
        st.integers(),
        st.text(string.ascii_letters, max_size=6).map(lambda t: f"/no/such/{t}.png"),
        st.sampled_from([(SIZE - 2, SIZE, 3), (SIZE, SIZE, 4), (SIZE,), (SIZE, SIZE, 3, 3, 3)]).map(
            lambda s: np.zeros(s, np.uint8)
        ),
        st.just(np.full(shape, 300, np.int32)),
        st.just(np.full(shape, 2.0) if floats_valid else float_without_range),
    )


IMAGE = np.zeros((SIZE, SIZE, 3), np.uint8)
IMAGE_SAMPLING = {
    **SAMPLING,
    "prompt": BAD_PROMPT,
    "image": bad_images((SIZE, SIZE, 3)),
    "strength": st.one_of(
        NOT_NUMBER, st.sampled_from([NAN, INF, -0.1, 1.5]), st.floats(min_value=1.01)
    ),
    "resize": NOT_FLAG,
}


def test_image_to_image(sd, no_model):
    kwargs = {**BASE, "prompt": "a red circle", "image": IMAGE, "strength": 0.5}
    run_generated(
        "image_to_image",
        one_bad(IMAGE_SAMPLING),
        lambda n, v: refuses(sd.image_to_image, n, v, kwargs),
    )


def test_inpaint(sd, no_model):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:24, 8:24] = True
    table = {
        **IMAGE_SAMPLING,
        "mask": st.one_of(
            bad_images((SIZE, SIZE, 1), floats_valid=True),
            st.sampled_from([NAN, 2.0, -1.0]).map(lambda v: np.full((SIZE, SIZE), v)),
            st.just(np.zeros((SIZE // 2, SIZE // 2), bool)),
        ),
        "keep_unmasked": NOT_FLAG,
    }
    kwargs = {**BASE, "prompt": "a red circle", "image": IMAGE, "mask": mask}
    run_generated("inpaint", one_bad(table), lambda n, v: refuses(sd.inpaint, n, v, kwargs))


def test_outpaint(sd, no_model):
    table = {
        **IMAGE_SAMPLING,
        "extend": st.one_of(
            NOT_INT.filter(lambda v: not isinstance(v, list) or len(v) != 4),
            st.integers(max_value=-1),
            st.just((0, 0, 0, 0)),
            st.integers(arguments.MAX_SIDE, 10**12),
            st.lists(st.integers(0, 8), min_size=1, max_size=6).filter(lambda v: len(v) != 4),
            st.tuples(*[st.integers(-5, 8)] * 4).filter(lambda v: min(v) < 0),
        ),
        "keep_unmasked": NOT_FLAG,
    }
    kwargs = {**BASE, "prompt": "a red circle", "image": IMAGE, "extend": (0, 8, 0, 8)}
    run_generated("outpaint", one_bad(table), lambda n, v: refuses(sd.outpaint, n, v, kwargs))


def test_encode_text(sd, no_model):
    run_generated(
        "encode_text",
        st.tuples(st.just("prompt"), BAD_PROMPT),
        lambda n, v: refuses(sd.encode_text, n, v, {}),
    )


def bad_config_value(rule):
    """A value that breaks one row of `keras_sd.models.validation.SPECS`."""
    kind = rule[0]
    if kind in ("int", "float"):
        low, high = rule[1], rule[2]
        numbers = st.one_of(
            st.integers(max_value=math.floor(low) - (kind == "int")),
            st.integers(min_value=high + 1),
            st.sampled_from([NAN, INF, -INF] if kind == "float" else [1.5]),
        )
        return st.one_of(numbers, st.none(), st.text(max_size=3), st.lists(st.integers()))
    if kind in ("bool", "str", "str or none"):
        return st.one_of(st.integers(), st.lists(st.integers(), min_size=1))
    bad_item = st.one_of(st.integers(max_value=0), st.text(max_size=2), st.none())
    if kind == "strs":
        return st.one_of(st.integers(), st.lists(st.integers(), min_size=1))
    return st.one_of(
        st.just([]),
        st.lists(bad_item, min_size=1, max_size=3),
        st.lists(st.integers(1, 8), min_size=9, max_size=12),
        st.text(max_size=3),
    )


def bad_config():
    """(key named in the error, config): one value broken, one key missing, or one
    component of the wrong type."""
    rows = [(c, key, rule) for c, spec in SPECS.items() for key, rule in spec.items()]
    tiny = presets.resolve_model_config("tiny")

    def broken(row, value):
        component, key, _ = row
        return key, {**tiny, component: {**tiny[component], key: value}}

    def missing(component):
        config = dict(tiny[component])
        key = REQUIRED[component][0]
        config.pop(key)
        return key, {**tiny, component: config}

    return st.one_of(
        st.sampled_from(rows).flatmap(
            lambda row: bad_config_value(row[2]).map(lambda v: broken(row, v))
        ),
        st.sampled_from(["unet", "vae", "text_encoder"]).map(missing),
        st.sampled_from(sorted(tiny)).map(lambda c: (c, {**tiny, c: [1, 2]})),
        st.text(max_size=6)
        .filter(lambda n: n not in presets.MODEL_CONFIGS)
        .map(lambda n: ("config", n)),
    )


def test_constructor(no_model):
    def construct(config="tiny", **kwargs):
        StableDiffusion(config=config, **{"img_height": SIZE, "img_width": SIZE, **kwargs})

    def check(name, value):
        if name == "config_value":
            key, config = value
            message = refuses(construct, "config", config, {})
            assert key in message, (key, message)
        else:
            refuses(construct, name, value, {})

    component = st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers()))
    table = {
        "img_height": BAD_SIDE | st.none(),
        "img_width": BAD_SIDE | st.none(),
        "jit_compile": st.one_of(
            st.text(max_size=4).filter(lambda t: t != "auto"), st.integers(2), st.none()
        ),
        "config_value": bad_config(),
        "scheduler": BAD_SCHEDULER,
        **dict.fromkeys(("text_encoder", "diffusion_model", "decoder", "image_encoder"), component),
        "tokenizer": st.one_of(st.integers(), st.text(max_size=3)),
    }
    KNOWN.update(table)
    run_generated("StableDiffusion()", one_bad(table), check)


def test_from_checkpoint_kwargs(no_model):
    path = presets.bundled_preset_path("tiny-shapes")
    table = {
        **dict.fromkeys(
            ("img_size", "img_width", "img_height"),
            st.one_of(
                NOT_INT.filter(lambda v: v is not None),
                st.integers(max_value=0),
                st.integers(min_value=arguments.MAX_SIDE + 1),
            ),
        ),
        "prediction_type": st.one_of(st.text(max_size=6), st.integers()).filter(
            lambda v: v not in ("epsilon", "v_prediction")
        ),
        "use_ema": NOT_FLAG,
        "config": st.one_of(st.integers(), st.lists(st.integers()), st.floats()),
        **dict.fromkeys(presets.COMPONENTS, st.one_of(st.integers(), st.text(max_size=3))),
    }
    KNOWN.update(table)
    run_generated(
        "from_checkpoint",
        one_bad(table),
        lambda n, v: refuses(StableDiffusion.from_checkpoint, n, v, {"path": path}),
    )


# ------------------------------------------------------------------------------ CLI
def words(max_size=6):
    return st.text(string.ascii_letters + string.digits + ".,_ ", min_size=1, max_size=max_size)


def accepted(text, convert, ok) -> bool:
    """Whether Python's own `convert` reads `text` as a value `ok` accepts (the oracle the
    generated command-line values are filtered by)."""
    try:
        return ok(convert(text))
    except ValueError:
        return False


def not_int(minimum):
    ints = st.integers(max_value=minimum - 1).map(str)
    return st.one_of(ints, words().filter(lambda t: not accepted(t, int, lambda v: v >= minimum)))


def cli_refuses(capsys, argv) -> None:
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, (argv, status, err)
    assert "error: " in err.strip().splitlines()[-1], (argv, err)


SAMPLING_FLAGS = {
    "--steps": not_int(1),
    "--batch-size": not_int(1),
    "--guidance": st.one_of(
        st.sampled_from(["nan", "inf", "-inf", "-1", "NaN"]),
        words().filter(lambda t: not accepted(t, float, lambda v: 0 <= v < INF)),
    ),
    "--seed": not_int(0),
    "--scheduler": words().filter(lambda t: t != "ddim"),
    "--jit-compile": words().filter(lambda t: t not in cli.JIT_CHOICES),
    "--preset": words().filter(lambda t: t not in presets.preset_names()),
    "-o": st.one_of(
        words().map(lambda t: f"{t}.txt"),
        words().map(lambda t: f"/no/such/{t}.png"),
        st.integers(256, 600).map(lambda n: "x" * n + ".png"),
    ),
}


def cli_check(capsys, tmp_path, command, extra, fixed):
    def check(flag, value):
        argv = [command, "a red circle", "-o", str(tmp_path / "out.png"), *fixed, flag, value]
        cli_refuses(capsys, argv)
        assert not (tmp_path / "out.png").exists()

    run_generated(f"keras-sd {command}", one_flag({**SAMPLING_FLAGS, **extra}), check)


def one_flag(table):
    return st.one_of(*(st.tuples(st.just(flag), values) for flag, values in table.items()))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("cli-inputs")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "image.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "mask.png")
    return str(folder / "image.png"), str(folder / "mask.png")


def test_cli_generate(capsys, tmp_path, no_model):
    cli_check(capsys, tmp_path, "generate", {"--width": not_int(1), "--height": not_int(1)}, [])


STRENGTH = st.one_of(
    st.sampled_from(["nan", "-0.5", "1.5", "inf"]),
    words().filter(lambda t: not accepted(t, float, lambda v: 0 <= v <= 1)),
)
MISSING = words().map(lambda t: f"/no/such/{t}.png")


def test_cli_img2img(capsys, tmp_path, no_model, image_files):
    extra = {"--strength": STRENGTH, "--image": MISSING}
    cli_check(capsys, tmp_path, "img2img", extra, ["--image", image_files[0]])


def test_cli_inpaint(capsys, tmp_path, no_model, image_files):
    extra = {"--strength": STRENGTH, "--mask": MISSING}
    fixed = ["--image", image_files[0], "--mask", image_files[1]]
    cli_check(capsys, tmp_path, "inpaint", extra, fixed)


def test_cli_outpaint(capsys, tmp_path, no_model, image_files):
    def valid(text):
        sides = [int(part) for part in text.split(",")]
        return len(sides) in (1, 4) and min(sides) >= 0 and any(sides)

    numbers = st.lists(st.integers(-9, 9), min_size=1, max_size=6).map(
        lambda v: ",".join(map(str, v))
    )
    extend = st.one_of(words(), numbers).filter(lambda t: not accepted(t, valid, bool))
    fixed = ["--image", image_files[0], "--extend", "0,8,0,8"]
    cli_check(capsys, tmp_path, "outpaint", {"--extend": extend}, fixed)


def test_cli_convert(capsys, tmp_path, no_model):
    src = presets.bundled_preset_path("tiny-shapes")
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "folder.safetensors").mkdir()
    cases = st.one_of(
        MISSING.map(lambda s: [s, str(tmp_path / "o.safetensors")]),
        words().map(lambda t: [src, f"/no/such/{t}/o.safetensors"]),
        st.integers(256, 600).map(lambda n: [src, str(tmp_path / ("y" * n + ".safetensors"))]),
        st.just([src, str(tmp_path / "file")]),  # exists, no --overwrite
        st.just([src, str(tmp_path / "file"), "--layout", "diffusers", "--overwrite"]),
        st.just([src, str(tmp_path / "folder.safetensors"), "--overwrite"]),
        st.just([src, src, "--overwrite"]),
        *(
            words()
            .filter(lambda t, ok=ok: t not in ok)
            .map(lambda t, flag=flag: [src, str(tmp_path / "o.safetensors"), flag, t])
            for flag, ok in (
                ("--layout", cli.LAYOUTS),
                ("--dtype", ("float32", "float16")),
                ("--prediction-type", ("epsilon", "v_prediction")),
            )
        ),
    )
    run_generated(
        "keras-sd convert",
        st.tuples(cases),
        lambda argv: cli_refuses(capsys, ["convert", *argv]),
    )


def test_cli_stderr_has_no_tensorflow_start_up_lines(tmp_path):
    """Only the error line: TensorFlow's C++ start-up lines are not let through."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    argv = ["generate", "x", "--preset", "nope", "-o", str(tmp_path / "out.png")]
    run = subprocess.run(
        [sys.executable, "-m", "keras_sd.cli", *argv], env=env, capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"keras-sd: error: unknown --preset 'nope'; choose one of {presets.preset_names()}"
    ], run.stderr


# ------------------------------------------------------------- NaN, memory, length
def test_nan_in_the_model_raises_instead_of_making_an_image(sd):
    kernel = sd.diffusion_model.conv_out.kernel
    saved = np.array(kernel.numpy())
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    try:
        with pytest.raises(FloatingPointError, match="denoised latents hold 1024 NaN/inf values"):
            sd.text_to_image("a red circle", num_steps=1, seed=0, progress=False)
    finally:
        kernel.assign(saved)  # the module's model is shared


def test_non_finite_output_names_float16_overflow():
    values = np.array([1.0, np.inf, np.nan], np.float32)
    half, full = SimpleNamespace(compute_dtype="float16"), SimpleNamespace(compute_dtype="float32")
    with pytest.raises(FloatingPointError, match="hold 2 NaN/inf.*float16 overflow"):
        arguments.check_finite(values, "decoded pixels", half)
    with pytest.raises(FloatingPointError) as error:
        arguments.check_finite(values, "decoded pixels", full)
    assert "float16" not in str(error.value) and "bad inputs" in str(error.value)
    finite = np.ones(3, np.float32)
    assert arguments.check_finite(finite, "x", full) is finite


def test_cli_exits_non_zero_on_a_non_finite_result(capsys, tmp_path, monkeypatch):
    def overflow(*args, **kwargs):
        raise FloatingPointError("the denoised latents hold 3 NaN/inf values")

    monkeypatch.setattr(StableDiffusion, "text_to_image", overflow)
    out = tmp_path / "out.png"
    status = cli.main(["generate", "x", "-o", str(out), "--steps", "1", "--no-compile-cache"])
    err = capsys.readouterr().err
    assert status == 1 and "NaN/inf" in err and "Traceback" not in err and not out.exists()


def sd15_like(backend_materializes=True):
    """The attributes `estimate_bytes` reads, with SD 1.5's sizes."""
    unet = SimpleNamespace(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        num_heads=(8,) * 4,
        attention_levels=(True, True, True, False),
        compute_dtype="float32",
    )
    decoder = SimpleNamespace(block_out_channels=(128, 256, 512, 512), compute_dtype="float32")
    return SimpleNamespace(diffusion_model=unet, decoder=decoder, latent_factor=8)


def test_memory_estimate_scales_with_batch_and_size():
    sd = sd15_like()
    one = arguments.estimate_bytes(sd, 1, 512, 512, guided=True)
    assert arguments.estimate_bytes(sd, 4, 512, 512, guided=True) == 4 * one
    assert arguments.estimate_bytes(sd, 1, 512, 512, guided=False) < one
    # Attention logits grow with the square of the pixels: far more than 4x per doubling.
    assert arguments.estimate_bytes(sd, 1, 1024, 1024, guided=True) > 8 * one
    # Everyday runs fit a 16 GiB machine; 4096 px squares fit none.
    assert one < 4 * 2**30
    assert arguments.estimate_bytes(sd, 1, 4096, 4096, guided=True) > 2**40


def test_run_larger_than_the_machine_is_refused_up_front(sd, no_model, monkeypatch):
    one = arguments.estimate_bytes(sd, 1, SIZE, SIZE, guided=True)
    monkeypatch.setattr(arguments, "memory_limit", lambda: int(2.5 * one))
    arguments.check_memory(sd, 2, SIZE, SIZE, guided=True)  # fits
    with pytest.raises(ValueError, match=r"3 image\(s\) of 32x32 need at least") as error:
        sd.text_to_image("a red circle", batch_size=3, num_steps=2, seed=0, progress=False)
    assert f"{3 * one / 2**20:,.1f} MiB" in str(error.value)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="lower batch_size"):  # the real machine's limit
        sd.text_to_image("a red circle", batch_size=10**7, num_steps=2, progress=False)


def test_fifty_thousand_character_prompt_encodes_in_half_a_second():
    from keras_sd.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()  # a fresh BPE cache
    letters = np.random.default_rng(0).choice(list(string.ascii_lowercase), 50_000)
    prompt = "".join(letters)  # one 50,000-letter word: BPE's worst case
    start = time.perf_counter()
    ids = tokenizer([prompt])
    elapsed = time.perf_counter() - start
    print(f"50,000-character prompt: {elapsed:.3f} s")
    assert elapsed < 0.5
    full = tokenizer.encode(prompt)
    assert len(full) > 77
    np.testing.assert_array_equal(ids[0], [*full[:76], tokenizer.end_token_id])
