"""The `keras-sd` command line.

    keras-sd generate "a red circle on a blue background" -o circle.png
    keras-sd convert v1-5-pruned-emaonly.ckpt sd15.safetensors --dtype float16

With neither `--preset` nor `--checkpoint` it uses the bundled `tiny-shapes`
model, so it works offline on a fresh machine. Errors in the arguments end the
program with status 2 and one line on stderr. The command owns its process, so
it asks TensorFlow to pool host memory (`keras_sd.backend.use_pooled_host_memory`;
`TF_CPU_ALLOCATOR_USE_BFC=false` keeps TensorFlow's default allocator).
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys

import numpy as np

DEFAULT_PRESET = "tiny-shapes"
SCHEDULERS = ("ddim",)
JIT_CHOICES = {"auto": "auto", "true": True, "false": False}
LAYOUTS = ("compvis", "diffusers", "keras")


class UsageError(ValueError):
    """An argument the user can fix; printed as one line."""


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keras-sd", description="Stable Diffusion in Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="text to image")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument("-o", "--output", default="out.png", help="PNG path (a grid for batches)")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from")
    gen.add_argument("--steps", type=_positive_int("--steps"), default=None, help="denoising steps")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    gen.add_argument("--seed", type=int, default=None, help="seed of the starting noise")
    gen.add_argument("--batch-size", type=_positive_int("--batch-size"), default=1)
    gen.add_argument("--width", type=_positive_int("--width"), default=None, help="pixels")
    gen.add_argument("--height", type=_positive_int("--height"), default=None, help="pixels")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help=f"named model (default {DEFAULT_PRESET})")
    source.add_argument("--checkpoint", default=None, help="checkpoint file or diffusers folder")
    gen.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    gen.add_argument(
        "--jit-compile",
        choices=tuple(JIT_CHOICES),
        default="auto",
        help="XLA for the sampling loop: auto (by device, precision and model size), true, false",
    )
    cache = gen.add_mutually_exclusive_group()
    cache.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="folder for compiled XLA programs, reused by later runs (default: "
        "$KERAS_SD_COMPILE_CACHE or ~/.cache/keras-sd/xla/...)",
    )
    cache.add_argument(
        "--no-compile-cache", action="store_true", help="compile afresh, store nothing"
    )

    conv = commands.add_parser(
        "convert",
        help="convert a checkpoint to safetensors",
        description="Read any checkpoint keras-sd loads (CompVis .safetensors/.ckpt, diffusers "
        "folder, KerasCV .h5) and write it as a CompVis single .safetensors file, a "
        "diffusers folder, or (--layout keras) keras-sd's own .safetensors layout, which "
        "loads fastest. Pickled .ckpt files are read without running their code.",
    )
    conv.add_argument("src", help="checkpoint file, diffusers folder or KerasCV .h5 file")
    conv.add_argument(
        "dst",
        help="a .safetensors file (CompVis layout, or keras-sd's with --layout keras) or a "
        "folder (diffusers)",
    )
    conv.add_argument("--layout", choices=LAYOUTS, default=None, help="default: from DST")
    conv.add_argument("--dtype", choices=("float32", "float16"), default=None)
    conv.add_argument("--config", default=None, help="model config name (default: detected)")
    conv.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    conv.add_argument("--use-ema", action="store_true", help="take the EMA weights if present")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser


def _check_output(path: str) -> None:
    """Fail before any model work if the image could not be written."""
    if not path.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
        raise UsageError(f"--output must end in .png, .jpg, .jpeg or .webp; got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--output {path!r} is a folder, not a file path")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"--output {path!r} is not writable")


def image_grid(images: np.ndarray) -> np.ndarray:
    """Tile a batch [B, H, W, 3] into one image, as square as possible.

    Example:
    >>> image_grid(np.zeros((3, 4, 5, 3), np.uint8)).shape
    (8, 10, 3)
    """
    count, height, width, channels = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = np.zeros((rows * height, cols * width, channels), images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    return grid


def save_image(image: np.ndarray, path: str) -> None:
    """Write atomically: a failed write never leaves a half-written file at `path`.
    The file gets the permissions of any new file (the umask's; `tempfile.mkstemp`
    would make it readable by its owner only)."""
    from PIL import Image

    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{os.path.splitext(name)[1]}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _load_model(args):
    from keras_sd import StableDiffusion

    jit = JIT_CHOICES[args.jit_compile]
    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist")
        return StableDiffusion.from_checkpoint(args.checkpoint, jit_compile=jit)
    return StableDiffusion.from_preset(args.preset or DEFAULT_PRESET, jit_compile=jit)


def generate(args) -> int:
    _check_output(args.output)
    from keras_sd import backend, presets

    preset = args.preset or (None if args.checkpoint else DEFAULT_PRESET)
    if preset is not None and preset not in presets.preset_names():
        raise UsageError(f"unknown --preset {preset!r}; choose one of {presets.preset_names()}")
    backend.use_pooled_host_memory()  # before any tensor exists, as is the cache
    if not args.no_compile_cache:
        backend.enable_compile_cache(args.compile_cache)
    sd = _load_model(args)
    kwargs = {"width": args.width, "height": args.height}
    for name in ("width", "height"):
        value = kwargs[name]
        if value is not None and value % sd.latent_factor:
            raise UsageError(
                f"--{name} must be a multiple of {sd.latent_factor} for this model; got {value}"
            )
    defaults = sd.defaults
    images = sd.text_to_image(
        args.prompt,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        num_steps=args.steps or defaults["num_steps"],
        unconditional_guidance_scale=(
            defaults["guidance_scale"] if args.guidance is None else args.guidance
        ),
        seed=args.seed,
        **kwargs,
    )
    save_image(image_grid(images) if len(images) > 1 else images[0], args.output)
    print(f"wrote {args.output} ({len(images)} image{'s' * (len(images) > 1)})")
    return 0


def convert(args) -> int:
    from keras_sd import backend
    from keras_sd.conversion import convert as convert_checkpoint

    if not os.path.exists(args.src):
        raise UsageError(f"SRC {args.src!r} does not exist")
    dst = os.path.abspath(args.dst)
    if os.path.exists(dst) and os.path.samefile(args.src, dst):
        raise UsageError(f"DST {args.dst!r} is SRC itself; write the conversion elsewhere")
    if os.path.exists(dst) and not args.overwrite:
        raise UsageError(f"DST {args.dst!r} exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(dst)):
        raise UsageError(f"the folder of DST {args.dst!r} does not exist")
    backend.use_pooled_host_memory()
    convert_checkpoint(
        args.src,
        args.dst,
        layout=args.layout,
        dtype=args.dtype,
        config=args.config,
        prediction_type=args.prediction_type,
        use_ema=args.use_ema,
    )
    print(f"wrote {args.dst}")
    return 0


COMMANDS = {"generate": generate, "convert": convert}


def main(argv=None) -> int:
    """Entry point of the `keras-sd` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # Nothing has imported TensorFlow yet (`keras_sd` imports its backend lazily). Its C++
    # start-up lines are noise here, and so is the error line it logs for every program
    # it loads from the compile cache (it tries the text format before the binary one):
    # quiet unless the user chose a level.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, PermissionError) as error:
        message = " ".join(str(error).split())
        print(f"keras-sd: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
