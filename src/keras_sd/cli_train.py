"""`keras-sd train-ti` and `generate --embedding`: textual inversion from the command line.

    keras-sd train-ti my-toy/ --token "<my-toy>" --init-token toy --steps 500 \\
        -o learned_embeds.safetensors
    keras-sd generate "a photo of a <my-toy>" --embedding learned_embeds.safetensors

`cli.py` registers these; this module imports nothing from it, so the two stay acyclic.
Argument errors are `ValueError`s, which the command prints as one line (status 2).
"""

from __future__ import annotations

import argparse
import math
import os


def _positive(kind, name):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {value}")
        return value

    return parse


def add_embedding_option(command) -> None:
    """`--embedding FILE` (repeatable) for the image-making commands."""
    command.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE",
        help="textual-inversion embedding to load (diffusers or AUTOMATIC1111 file); "
        "use its token in the prompt; repeatable",
    )


def load_embeddings(sd, args) -> None:
    """Load every `--embedding` file into `sd` (its own token)."""
    for path in getattr(args, "embedding", None) or []:
        if not os.path.isfile(path):
            raise ValueError(f"--embedding {path!r} does not exist")
        ids = sd.load_textual_inversion(path)
        print(f"loaded {path}: {len(ids)} vector{'s' * (len(ids) > 1)}")


def add_train_ti_parser(commands) -> None:
    """Register `train-ti` on the `keras-sd` sub-command parser."""
    train = commands.add_parser(
        "train-ti",
        help="learn a new token from a few images (textual inversion)",
        description="Add TOKEN to the model and train only its embedding on the images of "
        "IMAGES_DIR, captioned from templates ('a photo of a TOKEN', ...). Writes a "
        "diffusers learned_embeds.safetensors file that `generate --embedding` loads.",
    )
    train.add_argument("images_dir", help="folder with 3-5 images of the thing")
    train.add_argument("--token", required=True, help='placeholder, e.g. "<my-thing>"')
    train.add_argument("--init-token", default=None, help="one word the embedding starts from")
    train.add_argument("--num-vectors", type=_positive(int, "--num-vectors"), default=1)
    train.add_argument("--steps", type=_positive(int, "--steps"), default=500)
    train.add_argument("--learning-rate", type=_positive(float, "--learning-rate"), default=5e-3)
    train.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=1)
    train.add_argument(
        "--size",
        type=_positive(int, "--size"),
        default=None,
        help="training image side (default: the model's image size)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("-o", "--output", default="learned_embeds.safetensors")
    train.add_argument("--preset", default=None, help="model preset (default: tiny-shapes)")
    train.add_argument("--checkpoint", default=None, help="checkpoint file or folder")


def train_ti(args) -> int:
    """Run `keras-sd train-ti`; returns the exit status."""
    if not args.output.endswith(".safetensors"):
        raise ValueError(f"--output must end in .safetensors; got {args.output!r}")
    if not os.path.isdir(args.images_dir):
        raise ValueError(f"IMAGES_DIR {args.images_dir!r} is not a folder")
    import keras

    from keras_sd import StableDiffusion
    from keras_sd.training import TextualInversionTrainer, textual_inversion_dataset
    from keras_sd.training.textual_inversion_data import load_images

    images = load_images(args.images_dir)  # a bad folder fails before the model loads

    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint!r} does not exist")
        sd = StableDiffusion.from_checkpoint(args.checkpoint)
    else:
        sd = StableDiffusion.from_preset(args.preset or "tiny-shapes")
    trainer = TextualInversionTrainer(
        sd, args.token, args.init_token, num_vectors=args.num_vectors, seed=args.seed
    )
    size = args.size or sd.img_height
    data = textual_inversion_dataset(
        images,
        args.token,
        sd.tokenizer,
        size=size,
        repeats=math.ceil(args.steps * args.batch_size / len(images)),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    trainer.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.0))
    trainer.fit(data, epochs=1, steps_per_epoch=min(args.steps, len(data)), verbose=1)
    trainer.save_embedding(args.output)
    print(f"wrote {args.output} ({args.token}: {args.num_vectors} x {sd.text_encoder.hidden_dim})")
    return 0
