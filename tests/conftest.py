"""Shared test set-up: quiet backends, deterministic seeds, reference helpers."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's default host allocator, not the pool the keras-sd command asks for: a pool
# keeps its peak for the whole worker, and the full-size tests' peaks then add up past RAM.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "false")
# With oneDNN on (x86), TensorFlow's oneDNN ops pool host memory in an allocator of their
# own unless told to use the system's: that pool kept ~9 GB after a full-size test.
os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "true")

import atexit  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# One XLA compile cache for the whole session, set before TensorFlow or JAX starts:
# compiled programs take weights as arguments, so a program compiled once is loaded, not
# compiled, wherever the same one comes again (JAX: any process; TensorFlow: a process
# that traces the same functions in the same order, such as a repeated command). Workers
# and the child processes the tests start inherit these variables.
SESSION_COMPILE_CACHE = "KERAS_SD_TEST_SESSION_COMPILE_CACHE"
COMPILE_CACHE_VARIABLES = (  # what a test about the cache itself removes for its children
    "TF_XLA_FLAGS",
    "KERAS_SD_COMPILE_CACHE",
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
)
if not os.environ.get(SESSION_COMPILE_CACHE):  # the controller (or a lone pytest) makes it
    os.environ[SESSION_COMPILE_CACHE] = tempfile.mkdtemp(prefix="keras-sd-test-xla-")
    atexit.register(shutil.rmtree, os.environ[SESSION_COMPILE_CACHE], ignore_errors=True)
    os.environ["KERAS_SD_COMPILE_CACHE"] = os.environ[SESSION_COMPILE_CACHE]  # the CLI's
    # JAX recompiles (with a warning) when it reads an entry another process is still
    # writing, so both workers share its folder.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[SESSION_COMPILE_CACHE]
    # JAX stores only programs that took a second to compile; the tiny ones take less.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def tensorflow_compile_cache() -> str:
    """This worker's TensorFlow cache folder: TensorFlow writes an entry in place and a
    compile that reads a half-written one fails, so the two xdist workers (each running
    one test, and its children, at a time) never share one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return os.path.join(os.environ[SESSION_COMPILE_CACHE], f"tensorflow-{worker}")


_tf_flags = [  # a folder named before (the shell's, the controller's) is replaced
    flag
    for flag in os.environ.get("TF_XLA_FLAGS", "").split()
    if not flag.startswith("--tf_xla_persistent_cache_directory=")
]
_tf_flags.append(f"--tf_xla_persistent_cache_directory={tensorflow_compile_cache()}")
os.environ["TF_XLA_FLAGS"] = " ".join(_tf_flags)

# The comparisons against KerasCV's full-size models (its guides, generate_image parity)
# hold KerasCV's and keras-sd's SD 1.x models at once and train through them: more than
# the CI machine's 24 GB in one process. They run when KERAS_SD_KERAS_CV_FULL=1 is set.
collect_ignore = []
if os.environ.get("KERAS_SD_KERAS_CV_FULL") != "1":
    collect_ignore = [
        "compat/test_keras_cv_guides.py",
        "compat/test_keras_cv_parity.py",
        "compat/test_keras_cv_textual_inversion.py",
    ]


# A prime length: where a tensor larger than the pool wraps around it, the repeated values
# do not line up with its rows or channels.
_NORMAL_POOL_LENGTH = 16_777_259


@functools.lru_cache(maxsize=1)  # one pool-sized array held at a time
def _normal_pool(dtype: np.dtype, std: float) -> np.ndarray:
    """The seeded normal(0, std) pool, rounded once to `dtype` (numpy's float16 casts are
    slow per value)."""
    pool = np.random.default_rng(_NORMAL_POOL_LENGTH).standard_normal(
        _NORMAL_POOL_LENGTH, np.float32
    )
    pool *= np.float32(std)
    return pool.astype(dtype, copy=False)


def _drop_normal_pool() -> None:
    """Free the pool once a model is filled: a test's peak memory comes later."""
    _normal_pool.cache_clear()


def fill_pooled_normal(out: np.ndarray, rng, std: float) -> None:
    """Write seeded normal(0, std) values into the contiguous array `out`: the values of
    one pool from a start `rng` draws, wrapping around it.

    A copy instead of a draw per value, for full-size models (a billion values): each
    tensor's values are random and another tensor's start elsewhere in the pool, so a
    swapped, transposed or misplaced weight still changes the outputs.
    """
    pool = _normal_pool(out.dtype, float(std))
    flat = out.view()
    flat.shape = (-1,)  # raises where `out` is not contiguous (a reshape would copy)
    start, filled = int(rng.integers(len(pool))), 0
    while filled < flat.size:
        chunk = pool[start : start + flat.size - filled]
        flat[filled : filled + chunk.size] = chunk
        start, filled = 0, filled + chunk.size


def randomize_torch_module(module, seed: int = 0, std: float = 0.05, pooled: bool = False) -> None:
    """Fill every parameter of a PyTorch module with seeded random values.

    Default initialisations leave some layers at zero or one (norm scales, some
    output convolutions), which would let a wrong mapping pass unnoticed; random
    values everywhere make each weight matter. Norm scales stay near one so
    activations keep a sane size. `pooled`: values from `fill_pooled_normal` (full-size
    models), not randn's draws.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if pooled:  # the parameter's own memory, through numpy
                fill_pooled_normal(param.data.numpy(), rng, std)
            else:  # in place, with randn's draws (normal_ rounds small tensors otherwise)
                torch.randn(param.shape, generator=gen, out=param.data).mul_(std)
            if _is_norm_scale(name, param.shape):
                param.add_(1.0)
    _drop_normal_pool()


def _is_norm_scale(name: str, shape) -> bool:
    return len(shape) == 1 and "norm" in name and name.endswith("weight")


def random_torch_state_dict(module, seed: int = 0, std: float = 0.05, dtype="float32") -> dict:
    """The parameters `randomize_torch_module(module, seed, std, pooled=True)` would give,
    as numpy arrays of `dtype`, read from the names and shapes alone: `module` can be
    built on PyTorch's meta device, with no memory for float32 values it would not keep.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, param in module.named_parameters():
        state[name] = value = np.empty(tuple(param.shape), dtype)
        fill_pooled_normal(value, rng, std)
        if _is_norm_scale(name, value.shape):
            value += value.dtype.type(1.0)
    _drop_normal_pool()
    return state


# torch.nn.init functions that modules' constructors fill their parameters with.
_TORCH_INITS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
)


@contextlib.contextmanager
def torch_init_skipped():
    """torch.nn.init's functions (and transformers' table of them) do nothing inside:
    for models whose every parameter is written after construction."""
    import torch

    tables = [vars(torch.nn.init)]
    if "transformers.initialization" in sys.modules:
        tables.append(sys.modules["transformers.initialization"].TORCH_INIT_FUNCTIONS)
    saved = [(table, name, table[name]) for table in tables for name in _TORCH_INITS]
    try:
        for table, name, _ in saved:
            table[name] = lambda tensor, *args, **kwargs: tensor
        yield
    finally:
        for table, name, function in saved:
            table[name] = function


def random_torch_model(build, seed: int = 0, std: float = 0.05):
    """`build()` (a PyTorch module, often full size) with `randomize_torch_module`'s
    seeded random parameters, from the normal pool.

    The constructor's own initialization is skipped: at full size its values cost as much
    as the random ones that overwrite them.
    """
    with torch_init_skipped():
        module = build()
    randomize_torch_module(module, seed, std, pooled=True)
    return module


def keras_model_from_state_dict(build, state_dict: dict, prefix: str = "", ignore=()):
    """`build()` (a keras-sd model) with its variables created straight from a
    PyTorch-layout state dict, as `load_state_dict` would assign them (names and shapes
    checked by the same matching): its initializers never run."""
    import keras

    from keras_sd.weights import deferred
    from keras_sd.weights.state_dict import match_state_dict, torch_to_keras

    with keras.StatelessScope(initialize_variables=False):
        model = build()
    pairs, problems = match_state_dict(model, state_dict, prefix, ignore)
    if problems:
        deferred.forget_deferred([model])
        raise AssertionError(problems)
    deferred.initialize_deferred(
        [model], [(v, lambda v=v, t=t: torch_to_keras(np.asarray(t), v)) for v, t in pairs]
    )
    return model


def torch_state_dict(module) -> dict:
    """A module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def max_abs_normalized_error(actual, expected) -> float:
    """max |a - e| / max(std(e), 1e-6): the tolerance unit used by parity tests."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / max(expected.std(), 1e-6))


def tensorflow_buffer_address(value) -> int:
    """Where a TensorFlow variable's (or tensor's) values are in memory, through DLPack
    (TF's `numpy()` would copy them)."""
    import tensorflow as tf

    value = value.value.read_value() if hasattr(value, "value") else value

    class Exported:  # numpy reads DLPack through these two methods
        def __dlpack__(self, **kwargs):
            return tf.experimental.dlpack.to_dlpack(value)

        def __dlpack_device__(self):
            return (1, 0)  # CPU

    return np.from_dlpack(Exported()).ctypes.data


FULL_SIZE = "full-size"  # the xdist group of the tests that build full-size models
KERAS_CV_SIZE = 64  # pixels; KerasCV's UNet and decoder are built for one image size
# What each KerasCV fixture builds, kept while the tests in a row that use it run.
_keras_cv_built = {}
_KERAS_CV_FIXTURES = {"keras_cv_drop_in": "drop_in", "keras_cv_sd1": "sd1"}


def random_weight_value(weight, rng, std: float) -> np.ndarray:
    """Seeded random values (`fill_pooled_normal`'s: KerasCV's models are full size) for
    one Keras weight (norm scales near one)."""
    value = np.empty(tuple(weight.shape), np.float32)
    fill_pooled_normal(value, rng, std)
    if weight.path.endswith("gamma"):
        value += np.float32(1.0)
    return value


def randomize_keras_model(model, seed: int, std: float = 0.05) -> None:
    """Seeded random values in every weight of a Keras model (norm scales near one)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        weight.assign(random_weight_value(weight, rng, std))
    _drop_normal_pool()


def random_keras_cv_models(builders: dict, std: float) -> dict:
    """KerasCV models from zero-argument `builders`, with seeded random weights (the
    n-th model's from seed n; norm scales near one).

    The models are built without running their initializers (`keras.StatelessScope`),
    and each variable is created from its random values: at full size this saves the
    initial values' time and the memory their copies leave fragmented.
    """
    import keras

    from keras_sd.weights import deferred

    with keras.StatelessScope(initialize_variables=False):
        models = {name: build() for name, build in builders.items()}
    pairs = []
    for seed, model in enumerate(models.values()):
        rng = np.random.default_rng(seed)
        # initialize_deferred calls these in order, so each model's draws are sequential.
        pairs += [
            (weight, lambda w=weight, rng=rng: random_weight_value(w, rng, std))
            for weight in model.weights
        ]
    deferred.initialize_deferred(models.values(), pairs)
    _drop_normal_pool()
    return models


def bundled_vocab_path() -> str:
    """keras-sd's bundled CLIP BPE file, for KerasCV's tokenizer (which would download it)."""
    import keras_sd

    return os.path.join(
        os.path.dirname(keras_sd.__file__), "assets", "bpe_simple_vocab_16e6.txt.gz"
    )


def _keras_cv_uses(item) -> set:
    """Which KerasCV fixtures' models (`_keras_cv_built` keys) a test uses."""
    names = set(getattr(item, "fixturenames", ())) if item is not None else set()
    return {key for fixture, key in _KERAS_CV_FIXTURES.items() if fixture in names}


def keras_cv_sd1_components() -> dict:
    """Builders of KerasCV's four SD 1.x components at KERAS_CV_SIZE pixels."""
    from keras_cv.src.models.stable_diffusion import (
        decoder,
        diffusion_model,
        image_encoder,
        text_encoder,
    )

    size = KERAS_CV_SIZE
    return {
        "text_encoder": lambda: text_encoder.TextEncoder(77, download_weights=False),
        "diffusion_model": lambda: diffusion_model.DiffusionModel(
            size, size, 77, download_weights=False
        ),
        "decoder": lambda: decoder.Decoder(size, size, download_weights=False),
        "image_encoder": lambda: image_encoder.ImageEncoder(download_weights=False),
    }


@pytest.fixture
def keras_cv_sd1():
    """KerasCV's own SD 1.x pipeline (`keras_cv.models.StableDiffusion`) on seeded random
    weights (std 0.02), at KERAS_CV_SIZE pixels, with its four components built.

    KerasCV's components are full size (4.3 GB of weights), so they are built once and
    shared by every test that asks for them; the collection hook runs those tests one
    after another and the teardown hook drops the models after the last one. The
    tokenizer reads keras-sd's bundled CLIP vocabulary (KerasCV's would download it).
    """
    if "sd1" not in _keras_cv_built:
        _keras_cv_built["sd1"] = _build_keras_cv_sd1()
    return _keras_cv_built["sd1"]


def _build_keras_cv_sd1():
    import keras_cv
    from keras_cv.src.models.stable_diffusion import clip_tokenizer

    components = random_keras_cv_models(keras_cv_sd1_components(), std=0.02)
    # KerasCV rounds sizes to 128 px (64 to 0): built at 128, then set to the models' size.
    sd = keras_cv.models.StableDiffusion(img_height=128, img_width=128, jit_compile=False)
    for name, model in components.items():  # what KerasCV builds lazily, prebuilt
        setattr(sd, f"_{name}", model)
    sd._tokenizer = clip_tokenizer.SimpleTokenizer(bpe_path=bundled_vocab_path())
    sd.img_height = sd.img_width = KERAS_CV_SIZE
    return sd


@pytest.fixture
def keras_cv_drop_in(keras_cv_sd1):
    """`keras_sd.compat.keras_cv.models.StableDiffusion` converted from `keras_cv_sd1`
    (the same weights), at the same image size, not compiled with XLA (each compile of
    a full-size program costs about a minute on the 2-core machine)."""
    if "drop_in" not in _keras_cv_built:
        from keras_sd.compat import keras_cv

        sd = keras_cv.models.StableDiffusion.from_keras_cv(keras_cv_sd1, jit_compile=False)
        sd.img_height = sd.img_width = KERAS_CV_SIZE
        _keras_cv_built["drop_in"] = sd
    return _keras_cv_built["drop_in"]


def release_memory() -> None:
    """Collect Python's garbage and hand the freed heap pages back to the system.

    glibc keeps freed memory of allocations under its mmap threshold (most weights of
    a full-size model) in its arenas: without a trim, a dropped model's pages stay in
    the worker's resident memory under the next test's models.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Drop each KerasCV fixture's models after the last test in a row that uses them,
    and hand a full-size test's freed memory back to the system: the worker then runs
    small tests (and the other worker its own) without the big test's peak kept."""
    dropped = _keras_cv_uses(item) - _keras_cv_uses(nextitem)
    for key in dropped:
        _keras_cv_built.pop(key, None)
    if dropped or _full_size(item):
        release_memory()


def _full_size(item) -> bool:
    groups = {m.args[0] if m.args else None for m in item.iter_markers("xdist_group")}
    return item.get_closest_marker("slow") is not None or FULL_SIZE in groups


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests that build full-size models first, all in one xdist group.

    pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml) runs a group on one worker,
    one test after another: the slow-marked tests and the KerasCV module (its models
    are fixed at SD size) need up to 15 GB each, so two at once would not fit a 24 GB
    machine. Starting the group first lets the other worker run the small tests beside
    it instead of the group running alone at the end. Within the group, the tests that
    share the KerasCV models come first, one after another, so those are built once.
    Every other test runs on the worker that runs the rest of its file: a module's
    fixtures (a built pipeline, a documentation site) and compiled programs are then
    made once, not once per worker.
    """
    full, small = [], []
    for item in items:
        (full if _full_size(item) or _keras_cv_uses(item) else small).append(item)
    # Stable: file order otherwise. The drop-in's users (which also use KerasCV's models)
    # come first, then those of KerasCV's models alone, so that each is built once and
    # the drop-in is gone before the tests that build further models beside KerasCV's.
    full.sort(key=lambda item: 2 - len(_keras_cv_uses(item)))
    for item in full:
        item.add_marker(pytest.mark.xdist_group(FULL_SIZE))
    for item in small:
        if not any(True for _ in item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items[:] = full + small


@pytest.fixture(autouse=True, scope="session")
def _full_float32_on_accelerators():
    """Full float32 matrix products and convolutions on GPUs for the whole session.

    On GPUs the backends run float32 on TF32 units by default (JAX and TensorFlow for
    matrix products and convolutions, PyTorch for cuDNN convolutions): a 10-bit mantissa,
    about 1e-3 relative error, while the parity tolerances are for float32. Seen on an
    H200: the float32-upcast VAE under JAX missed the float32 tolerance by 2e-3 and met
    it with JAX's "highest" precision. Nothing changes on a CPU.
    """
    import keras

    from keras_sd.backend import has_accelerator

    if not has_accelerator():
        return
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(0)
    np.random.seed(0)


@pytest.fixture
def fresh_programs():
    """No shared compiled program before or after the test: its pipelines trace their
    own (for tests that count traces or patch code that runs while tracing)."""
    from keras_sd import backend

    backend.clear_shared_programs()
    yield
    backend.clear_shared_programs()


def _record_calls(monkeypatch, name: str) -> list:
    """Records the input shape of each call of the convolution `conv.<name>` by a
    layer (at trace time when compiled)."""
    from keras_sd.models import conv

    calls = []
    compute = getattr(conv, name)

    def counted(x, kernel):
        calls.append(tuple(x.shape))
        return compute(x, kernel)

    monkeypatch.setattr(conv, name, counted)
    return calls


@pytest.fixture
def winograd_calls(monkeypatch, fresh_programs):
    """Input shapes of the Winograd convolutions layers ran (`conv.winograd_conv3x3`)."""
    return _record_calls(monkeypatch, "winograd_conv3x3")


@pytest.fixture
def gemm_calls(monkeypatch, fresh_programs):
    """Input shapes of the GEMM convolutions layers ran (`conv.gemm_conv3x3`)."""
    return _record_calls(monkeypatch, "gemm_conv3x3")


# ------------------------------------------- shared tiny components (tests/tiny_components.py)
# Imported last: tiny_components imports the helpers above from this module.
from tiny_components import (  # noqa: E402, F401
    tiny_diffusers_pipe,
    tiny_keras_sd,
    tiny_reference_images,
)
