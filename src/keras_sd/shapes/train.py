"""Train the bundled tiny-shapes model: `python -m keras_sd.shapes.train`.

Reproducible (fixed seeds) and CPU-sized. Two stages, both with keras-sd's own trainers
and the built-in `fit()`:

1. `VAETrainer`: a small KL autoencoder (64 px images -> 16x16x4 latents) on jittered
   shapes images of the training combinations; its reconstructions are checked with
   `shapes.checker.score`. The latent scaling factor is then set to 1 / std of the
   latents, as Stable Diffusion chose 0.18215.
2. `DiffusionTrainer`: UNet + text encoder on precomputed latents of the training
   combinations only (`shapes.dataset.train_combinations()`), with 10% empty prompts
   for classifier-free guidance.

The script evaluates the result with the checker (training and held-out combinations,
guidance 7.5 and 1.0), writes the bundle, a sample grid and a JSON report, and prints its
wall time. Stages and sizes are flags, so `--vae-epochs 1 --unet-epochs 1 --eval-images 1`
gives a quick smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_sd.models.vae import VAEDecoder, VAEEncoder  # noqa: E402
from keras_sd.pipeline import StableDiffusion  # noqa: E402
from keras_sd.shapes import checker, dataset  # noqa: E402
from keras_sd.training import DiffusionTrainer, VAETrainer  # noqa: E402

IMAGE_SIZE = 64
# Captions are 11 tokens with start and end; 16 positions leave room for "an", "."
MAX_LENGTH = 16
TINY_SHAPES_CONFIG = {
    "tokenizer": {"max_length": MAX_LENGTH},
    "text_encoder": {
        "vocab_size": 49408,
        "max_length": MAX_LENGTH,
        "hidden_dim": 64,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_dim": 128,
        "activation": "quick_gelu",
        "layer_norm_epsilon": 1e-5,
    },
    "unet": {
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "attention_levels": (False, True),
        "num_heads": 2,
        "cross_attention_dim": 64,
        "use_linear_projection": True,
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "norm_eps": 1e-6,
        "scaling_factor": 1.0,  # replaced by the measured one after stage 1
    },
    "scheduler": {},
}


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(pixels) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255]."""
    pixels = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(pixels, "float32")))
    return np.round(np.clip((pixels + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)


def warmup_cosine(peak: float, steps: int, warmup: int) -> keras.optimizers.schedules.CosineDecay:
    """Linear warm-up to `peak`, then cosine decay to 1% of it over the remaining steps."""
    return keras.optimizers.schedules.CosineDecay(
        0.0, max(steps - warmup, 1), alpha=0.01, warmup_target=peak, warmup_steps=warmup
    )


def fit_vae(encoder, decoder, images: np.ndarray, epochs: int, lr: float, args) -> list:
    """Fit the autoencoder (only its trainable parts) on uint8 images; the loss history."""
    steps = epochs * (len(images) // args.vae_batch)
    trainer = VAETrainer(encoder, decoder, kl_weight=args.kl_weight, seed=args.seed)
    trainer.compile(
        optimizer=keras.optimizers.Adam(warmup_cosine(lr, steps, steps // 20)),
        jit_compile=args.jit_compile,
    )
    history = trainer.fit(
        to_unit_range(images), batch_size=args.vae_batch, epochs=epochs, shuffle=True, verbose=2
    )
    return [float(v) for v in history.history["loss"]]


def reconstruction_scores(encoder, decoder, seed: int, prefix: str = "vae") -> dict:
    """Checker scores of reconstructions of fresh renders, train and held-out combinations."""
    scores = {}
    for split, combos in (("train", dataset.train_combinations()), ("held_out", dataset.HELD_OUT)):
        test, captions = dataset.make_dataset(
            len(combos) * 2, IMAGE_SIZE, seed=seed, combinations=list(combos)
        )
        recon = decoder.predict(mean_latents(encoder, test), batch_size=64, verbose=0)
        scores[f"{prefix}_reconstruction_score_{split}"] = checker.score(to_uint8(recon), captions)
    print(scores, flush=True)
    return scores


def train_vae(encoder, decoder, args) -> dict:
    """Stage 1: fit encoder and decoder; their loss history and reconstruction scores."""
    images, _ = dataset.make_dataset(args.vae_images, IMAGE_SIZE, seed=args.seed)
    report = {"vae_loss": fit_vae(encoder, decoder, images, args.vae_epochs, args.vae_lr, args)}
    report.update(reconstruction_scores(encoder, decoder, args.seed + 1))
    return report


def refine_decoder(encoder, decoder, args) -> dict:
    """Stage 3: more decoder training on fresh renders, the encoder (and so the UNet's
    latent space) frozen; cheaper than a longer stage 1 and usable after stage 2."""
    images, _ = dataset.make_dataset(args.vae_images, IMAGE_SIZE, seed=args.seed + 4)
    encoder.trainable = False
    report = {
        "decoder_loss": fit_vae(
            encoder, decoder, images, args.decoder_epochs, args.decoder_lr, args
        )
    }
    report.update(reconstruction_scores(encoder, decoder, args.seed + 1, prefix="refined"))
    return report


def mean_latents(encoder, images: np.ndarray) -> np.ndarray:
    """Unscaled posterior means [N, h, w, C] of uint8 images."""
    moments = encoder.predict(to_unit_range(images), batch_size=64, verbose=0)
    return moments[..., : encoder.latent_channels]


def train_unet(sd, args) -> dict:
    """Stage 2: fit UNet + text encoder on latents of the training combinations."""
    # Whole batches only: with a partial last batch TensorFlow traces a dynamic batch size,
    # and the UNet's Transformer2D reshape then loses its static channel count.
    count = args.unet_images - args.unet_images % args.unet_batch
    images, captions = dataset.make_dataset(count, IMAGE_SIZE, seed=args.seed + 2)
    moments = sd.image_encoder.predict(to_unit_range(images), batch_size=64, verbose=0)
    mean, logvar = np.split(moments, 2, axis=-1)
    rng = np.random.default_rng(args.seed)
    latents = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * rng.standard_normal(mean.shape)
    latents = (latents * sd.decoder.scaling_factor).astype(np.float32)
    token_ids = sd.tokenizer(captions)
    steps = args.unet_epochs * (len(latents) // args.unet_batch)
    trainer = DiffusionTrainer(
        sd.text_encoder,
        sd.diffusion_model,
        sd.image_encoder,
        sd.scheduler,
        unconditional_token_ids=sd.tokenizer("")[0],
        condition_dropout=0.1,
        seed=args.seed,
        snr_gamma=args.snr_gamma,
    )
    trainer.compile(
        optimizer=keras.optimizers.AdamW(
            warmup_cosine(args.unet_lr, steps, min(200, steps // 10)), weight_decay=1e-2
        ),
        jit_compile=args.jit_compile,
    )
    history = trainer.fit(
        {"latents": latents, "token_ids": token_ids},
        batch_size=args.unet_batch,
        epochs=args.unet_epochs,
        shuffle=True,
        verbose=2,
    )
    return {"unet_loss": [float(v) for v in history.history["loss"]], "unet_steps": steps}


def evaluate(sd, combos, guidance: float, images_per_prompt: int, num_steps: int, seed: int):
    """Checker score of `images_per_prompt` images for each combination's caption."""
    images, prompts = [], []
    for i, combo in enumerate(combos):
        out = sd.text_to_image(
            combo.caption,
            batch_size=images_per_prompt,
            num_steps=num_steps,
            unconditional_guidance_scale=guidance,
            seed=seed + i,
            progress=False,
        )
        images.extend(out)
        prompts.extend([combo.caption] * images_per_prompt)
    return checker.score(images, prompts), np.stack(images)


def save_grid(images: np.ndarray, columns: int, path: str) -> None:
    """Tile images [N, H, W, 3] into rows of `columns` and save a PNG."""
    from PIL import Image

    rows = -(-len(images) // columns)
    h, w = images.shape[1:3]
    grid = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        grid[
            (i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w
        ] = image
    Image.fromarray(grid).save(path)


def train_first_stages(args, report: dict) -> StableDiffusion:
    """Stages 1 and 2 from scratch; returns the trained pipeline."""
    start = time.perf_counter()
    config = json.loads(json.dumps(TINY_SHAPES_CONFIG))  # a fresh copy, tuples as lists
    encoder, decoder = VAEEncoder(**config["vae"]), VAEDecoder(**config["vae"])
    report.update(train_vae(encoder, decoder, args))
    report["vae_seconds"] = time.perf_counter() - start
    sample, _ = dataset.make_dataset(1024, IMAGE_SIZE, seed=args.seed + 3)
    scale = float(1.0 / np.std(mean_latents(encoder, sample)))
    config["vae"]["scaling_factor"] = scale
    report["scaling_factor"] = scale
    sd = StableDiffusion(IMAGE_SIZE, IMAGE_SIZE, jit_compile=args.jit_compile, config=config)
    for source, target in ((encoder, sd.image_encoder), (decoder, sd.decoder)):
        target.set_weights(source.get_weights())
    report.update(train_unet(sd, args))
    return sd


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="src/keras_sd/assets/tiny-shapes.safetensors")
    p.add_argument("--report", default="tiny-shapes-report.json")
    p.add_argument("--grid", default="docs/images/tiny-shapes-grid.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-images", type=int, default=2048)
    p.add_argument("--vae-epochs", type=int, default=3)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--unet-images", type=int, default=135 * 32)
    p.add_argument("--unet-epochs", type=int, default=15)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument(
        "--snr-gamma", type=float, default=None, help="Min-SNR-gamma loss weights (e.g. 5)"
    )
    p.add_argument("--decoder-epochs", type=int, default=0)
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument(
        "--init", help="start from this bundle: skip stage 1, continue stage 2 if --unet-epochs"
    )
    p.add_argument("--eval-images", type=int, default=4)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument(
        "--eval-guidance",
        type=float,
        nargs="*",
        default=[7.5, 1.0],
        help="guidance scales to evaluate (none: skip the evaluation)",
    )
    p.add_argument("--no-jit", dest="jit_compile", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    report = {"args": vars(args)}
    if args.init:
        sd = StableDiffusion.from_checkpoint(args.init, jit_compile=args.jit_compile)
        if args.unet_epochs:  # continue stage 2 (use another --seed for fresh renders)
            report.update(train_unet(sd, args))
    else:
        sd = train_first_stages(args, report)
    if args.decoder_epochs:
        report.update(refine_decoder(sd.image_encoder, sd.decoder, args))
    report["train_seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    sd.save_checkpoint(args.out, layout="keras", dtype="float16")
    print(f"trained in {report['train_seconds']:.0f} s; saved {args.out}", flush=True)

    splits = {"train": dataset.train_combinations(), "held_out": list(dataset.HELD_OUT)}
    for guidance in args.eval_guidance:
        for split, combos in splits.items():
            value, images = evaluate(
                sd, combos, guidance, args.eval_images, args.eval_steps, args.seed + 100
            )
            report[f"score_{split}_guidance_{guidance}"] = value
            print(f"score {split} guidance {guidance}: {value:.4f}", flush=True)
            if guidance == 7.5 and split == "held_out" and args.grid:
                os.makedirs(os.path.dirname(args.grid) or ".", exist_ok=True)
                save_grid(images[:: args.eval_images][:15], 5, args.grid)
    report["total_seconds"] = time.perf_counter() - start
    print(f"wall time {report['total_seconds']:.0f} s", flush=True)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
