"""The `keras-sd` command line.

    keras-sd generate "a red circle on a blue background" -o circle.png
    keras-sd img2img "a green circle on a blue background" --image circle.png --strength 0.6
    keras-sd inpaint "a yellow square on a blue background" --image circle.png --mask mask.png
    keras-sd outpaint "a red circle on a blue background" --image circle.png --extend 0,16,0,16
    keras-sd convert v1-5-pruned-emaonly.ckpt sd15.safetensors --dtype float16
    keras-sd train-ti my-toy/ --token "<my-toy>" --init-token toy -o learned_embeds.safetensors

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
import sys

from keras_sd import cli_train, images
from keras_sd.utils import save_images

DEFAULT_PRESET = "tiny-shapes"
SCHEDULERS = ("ddim",)
JIT_CHOICES = {"auto": "auto", "true": True, "false": False}
LAYOUTS = ("compvis", "diffusers", "keras")


class UsageError(ValueError):
    """An argument the user can fix; printed as one line."""


def _positive_int(name, minimum: int = 1):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {value}")
        return value

    return parse


def _guidance(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--guidance must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"--guidance must be a finite number >= 0, got {text!r}")
    return value


def _strength(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--strength must be a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--strength must be in [0, 1], got {value}")
    return value


def _extend(text):
    try:
        sides = [int(part) for part in text.split(",")]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 4
    if len(sides) != 4 or min(sides) < 0:
        raise argparse.ArgumentTypeError(
            f"--extend must be TOP,RIGHT,BOTTOM,LEFT pixels (or one number), got {text!r}"
        )
    if not any(sides):
        raise argparse.ArgumentTypeError("--extend must grow at least one side, got all zeros")
    return tuple(sides)


def _add_sampling_options(command) -> None:
    """The options every image-making command shares."""
    command.add_argument("prompt", help="what to draw")
    command.add_argument("-o", "--output", default="out.png", help="PNG path (a grid for batches)")
    command.add_argument("--negative-prompt", default=None, help="what to steer away from")
    command.add_argument(
        "--steps", type=_positive_int("--steps"), default=None, help="denoising steps"
    )
    command.add_argument("--guidance", type=_guidance, default=None, help="guidance weight")
    command.add_argument(
        "--seed", type=_positive_int("--seed", minimum=0), default=None, help="seed of the noise"
    )
    command.add_argument("--batch-size", type=_positive_int("--batch-size"), default=1)
    source = command.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help=f"named model (default {DEFAULT_PRESET})")
    source.add_argument("--checkpoint", default=None, help="checkpoint file or diffusers folder")
    command.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    command.add_argument(
        "--jit-compile",
        choices=tuple(JIT_CHOICES),
        default="auto",
        help="XLA for the sampling loop: auto (by device, precision and model size), true, false",
    )
    cache = command.add_mutually_exclusive_group()
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


def _add_image_options(command, strength: float) -> None:
    command.add_argument("--image", required=True, help="input image file (RGB, RGBA or grey)")
    command.add_argument(
        "--strength",
        type=_strength,
        default=strength,
        help=f"share of the denoising steps run, in [0, 1] (default {strength})",
    )
    command.add_argument(
        "--resize",
        action="store_true",
        help="resize an image whose sides are not multiples of the model's size multiple",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keras-sd", description="Stable Diffusion in Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="text to image")
    _add_sampling_options(gen)
    gen.add_argument("--width", type=_positive_int("--width"), default=None, help="pixels")
    gen.add_argument("--height", type=_positive_int("--height"), default=None, help="pixels")
    cli_train.add_embedding_option(gen)
    img2img = commands.add_parser("img2img", help="redraw an image from a prompt")
    _add_sampling_options(img2img)
    _add_image_options(img2img, strength=0.8)
    inpaint = commands.add_parser("inpaint", help="repaint the masked part of an image")
    _add_sampling_options(inpaint)
    _add_image_options(inpaint, strength=1.0)
    inpaint.add_argument(
        "--mask", required=True, help="mask image file, white where the image is repainted"
    )
    outpaint = commands.add_parser("outpaint", help="grow an image and paint the new border")
    _add_sampling_options(outpaint)
    _add_image_options(outpaint, strength=1.0)
    outpaint.add_argument(
        "--extend",
        type=_extend,
        required=True,
        metavar="TOP,RIGHT,BOTTOM,LEFT",
        help="pixels to add per side, rounded up to multiples of the model's size multiple",
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
    cli_train.add_train_ti_parser(commands)
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
    # Opening is the one test that sees everything: permissions (which os.access does not
    # apply to root), read-only file systems, names too long for the file system.
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as error:
        raise UsageError(f"--output {path!r} cannot be written: {error.strerror}") from None
    if not existed:
        os.remove(path)


def _load_model(args):
    from keras_sd import StableDiffusion

    jit = JIT_CHOICES[args.jit_compile]
    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist")
        return StableDiffusion.from_checkpoint(args.checkpoint, jit_compile=jit)
    return StableDiffusion.from_preset(args.preset or DEFAULT_PRESET, jit_compile=jit)


def _prepare(args):
    """Check the arguments that need no model, then load it (raises UsageError)."""
    _check_output(args.output)
    _import_backend_quietly()
    from keras_sd import backend, presets

    preset = args.preset or (None if args.checkpoint else DEFAULT_PRESET)
    if preset is not None and preset not in presets.preset_names():
        raise UsageError(f"unknown --preset {preset!r}; choose one of {presets.preset_names()}")
    backend.use_pooled_host_memory()  # before any tensor exists, as is the cache
    if not args.no_compile_cache:
        backend.enable_compile_cache(args.compile_cache)  # before any tensor exists
    return _load_model(args)


def _sampling_kwargs(args, sd) -> dict:
    defaults = sd.defaults
    return {
        "negative_prompt": args.negative_prompt,
        "batch_size": args.batch_size,
        "num_steps": args.steps or defaults["num_steps"],
        "unconditional_guidance_scale": (
            defaults["guidance_scale"] if args.guidance is None else args.guidance
        ),
        "seed": args.seed,
    }


def _write(result, args) -> int:
    save_images(result, args.output)
    print(f"wrote {args.output} ({len(result)} image{'s' * (len(result) > 1)})")
    return 0


def generate(args) -> int:
    sd = _prepare(args)  # the model's own check states its size rule for --width/--height
    cli_train.load_embeddings(sd, args)
    kwargs = {"width": args.width, "height": args.height}
    return _write(sd.text_to_image(args.prompt, **_sampling_kwargs(args, sd), **kwargs), args)


def _read_inputs(args):
    """The --image (and --mask) files, read before any model loads so that a bad file
    fails at once: float [B, H, W, 3] in [0, 1] (and the masks)."""
    pixels = images.read_images(args.image, name="--image")
    if getattr(args, "mask", None) is None:
        return pixels, None
    return pixels, images.read_masks(args.mask, pixels.shape[1:3], name="--mask")


def img2img(args) -> int:
    pixels, _ = _read_inputs(args)
    sd = _prepare(args)
    result = sd.image_to_image(
        args.prompt,
        pixels,
        strength=args.strength,
        value_range=(0, 1),
        resize=args.resize,
        **_sampling_kwargs(args, sd),
    )
    return _write(result, args)


def inpaint(args) -> int:
    pixels, masks = _read_inputs(args)
    sd = _prepare(args)
    result = sd.inpaint(
        args.prompt,
        pixels,
        masks,
        strength=args.strength,
        value_range=(0, 1),
        resize=args.resize,
        **_sampling_kwargs(args, sd),
    )
    return _write(result, args)


def outpaint(args) -> int:
    pixels, _ = _read_inputs(args)
    sd = _prepare(args)
    result = sd.outpaint(
        args.prompt,
        pixels,
        args.extend,
        strength=args.strength,
        value_range=(0, 1),
        resize=args.resize,
        **_sampling_kwargs(args, sd),
    )
    return _write(result, args)


def convert(args) -> int:
    _import_backend_quietly()
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
    # keras_sd.conversion.convert's default: a .safetensors name is one file, else a folder.
    layout = args.layout or ("compvis" if dst.lower().endswith(".safetensors") else "diffusers")
    if layout == "diffusers" and os.path.exists(dst) and not os.path.isdir(dst):
        raise UsageError(f"DST {args.dst!r} is a file; --layout diffusers writes a folder")
    if layout != "diffusers" and os.path.isdir(dst):
        raise UsageError(f"DST {args.dst!r} is a folder; --layout {layout} writes one file")
    if len(os.path.basename(dst).encode()) > _name_max(os.path.dirname(dst)):
        raise UsageError(f"DST {args.dst!r}: the name is too long for the file system")
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


COMMANDS = {
    "generate": generate,
    "img2img": img2img,
    "inpaint": inpaint,
    "outpaint": outpaint,
    "convert": convert,
    "train-ti": cli_train.train_ti,
}


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


def _import_backend_quietly() -> None:
    """Import Keras (and so its backend) with stderr closed, unless the user chose a
    TensorFlow log level: TensorFlow's C++ start-up lines (oneDNN, CUDA drivers, CPU
    instructions) are written before TF_CPP_MIN_LOG_LEVEL is read, and are noise here."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    # Later lines, such as the error it logs for every program loaded from the compile
    # cache (it tries the text format before the binary one), do follow the level.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main(argv=None) -> int:
    """Entry point of the `keras-sd` console script; returns the exit status: 2 for a bad
    argument, 1 for a run that failed (a non-finite result, a file that could not be
    written), with one line on stderr either way."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, PermissionError) as error:
        return _fail(error, 2)
    except (FloatingPointError, OSError) as error:
        return _fail(error, 1)


def _fail(error: Exception, status: int) -> int:
    message = " ".join(str(error).split())
    print(f"keras-sd: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
