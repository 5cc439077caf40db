"""Where does keras-sd's UNet spend its time compared with KerasCV's? (TensorFlow, CPU)

    python benchmarks/profile_unet.py --size 256 --policy float32 mixed_bfloat16 --ablate

Times the same SD 1.5 pieces (GroupNorm, resnet block, attention, transformer
block, spatial transformer, up/downsampler) built by keras-sd and by KerasCV, each
in a `tf.function` graph (no XLA, keras-sd's CPU default), at the shapes of one
guided denoising step (batch 2). keras-sd and KerasCV calls alternate, so load
from other processes hits both alike; the figure is the best of `--repeats`.
Then it times the whole keras-sd UNet and, with `--ablate`, the same UNet with
one piece swapped for a candidate implementation (patched in this process only),
calls again alternating, to measure what a change to `src/` would buy. The whole
UNets of the libraries are compared by `bench.py`. Random weights: speed does not
depend on values. One process per policy (each needs about 6 GB at full size).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import time
from unittest import mock

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

LEVELS = ((320, 8), (640, 8), (1280, 8), (1280, 8))  # SD 1.5: channels, heads per level


def traced(fn, args: tuple):
    """`fn` as a TensorFlow graph, traced and run once (so later calls only execute)."""
    graph = tf.function(fn)
    graph(*args).numpy()
    return graph


def best_times(graphs: dict, args: tuple, repeats: int) -> dict:
    """Best-of-`repeats` seconds per traced graph, calls interleaved round-robin."""
    times = {k: [] for k in graphs}
    for _ in range(repeats):
        for k, g in graphs.items():
            start = time.perf_counter()
            g(*args).numpy()
            times[k].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def rand(*shape):
    """Random inputs in the policy's compute dtype, as the layers get them in a model."""
    values = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return tf.constant(values, keras.config.dtype_policy().compute_dtype)


def pieces(size: int, batch: int):
    """(name, keras-sd callable, KerasCV callable, inputs) for each compared piece."""
    from keras_cv.src.models.stable_diffusion import diffusion_model as kcv
    from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D

    from keras_sd.models import layers as ks
    from keras_sd.models import transformer as kt

    latent, temb, ctx = size // 8, rand(batch, 1280), rand(batch, 77, 768)
    out = []
    for level, (ch, heads) in enumerate(LEVELS[:3]):
        side = latent >> level
        x = rand(batch, side, side, ch)
        tag = f"L{level} {side}x{side}x{ch}"
        gn = ks.GroupNorm(32, 1e-5)
        ref_gn = keras.layers.GroupNormalization(groups=32, epsilon=1e-5)
        out.append((f"GroupNorm {tag}", gn, ref_gn, (x,)))
        res = ks.ResnetBlock(ch)
        res.build(x.shape, temb.shape)
        ref_res = kcv.ResBlock(ch)
        out.append((f"ResnetBlock {tag}", lambda x, t, m=res: m(x, t),
                    lambda x, t, m=ref_res: m([x, t]), (x, temb)))  # fmt: skip
        seq = ops.reshape(x, (batch, side * side, ch))
        attn = kt.Attention(heads, ch // heads)
        attn.build(seq.shape)
        ref_attn = kcv.CrossAttention(heads, ch // heads)
        out.append((f"self-attention {tag}", attn, ref_attn, (seq,)))
        block = kt.BasicTransformerBlock(heads, ch // heads)
        block.build(seq.shape, ctx.shape)
        ref_block = kcv.BasicTransformerBlock(ch, heads, ch // heads)
        out.append((f"BasicTransformerBlock {tag}", lambda s, c, m=block: m(s, c),
                    lambda s, c, m=ref_block: m([s, c]), (seq, ctx)))  # fmt: skip
        tr = kt.Transformer2D(heads, ch // heads)
        tr.build(x.shape, ctx.shape)
        ref_tr = kcv.SpatialTransformer(heads, ch // heads)
        out.append((f"Transformer2D {tag}", lambda x, c, m=tr: m(x, c),
                    lambda x, c, m=ref_tr: m([x, c]), (x, ctx)))  # fmt: skip
        down = ks.Downsample2D(padding=1)
        ref_down = PaddedConv2D(ch, 3, strides=2, padding=1)
        out.append((f"Downsample {tag}", down, ref_down, (x,)))
        small = rand(batch, side // 2, side // 2, ch)
        out.append((f"Upsample {side // 2}->{side}x{ch}", ks.Upsample2D(), kcv.Upsample(ch),
                    (small,)))  # fmt: skip
    return out + vae_pieces(size)


def vae_pieces(size: int):
    """The VAE decoder (one image) and its largest pieces, keras-sd vs KerasCV."""
    from keras_cv.src.models.stable_diffusion import resnet_block
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.padded_conv2d import PaddedConv2D

    from keras_sd.models import layers as ks
    from keras_sd.models import vae

    x = rand(1, size, size, 128)
    res = ks.ResnetBlock(128)
    res.build(x.shape)
    ref_up = keras.Sequential([keras.layers.UpSampling2D(2), PaddedConv2D(256, 3, padding=1)])
    return [
        (f"VAE GroupNorm {size}x{size}x128", ks.GroupNorm(32, 1e-6),
         keras.layers.GroupNormalization(groups=32, epsilon=1e-6), (x,)),
        (f"VAE ResnetBlock {size}x{size}x128", res, resnet_block.ResnetBlock(128), (x,)),
        (f"VAE Upsample {size // 2}->{size}x256", ks.Upsample2D(), ref_up,
         (rand(1, size // 2, size // 2, 256),)),
        (f"VAE decoder {size // 8}x{size // 8}x4 -> {size}x{size}x3",
         vae.VAEDecoder(**vae.SD1_CONFIG), Decoder(size, size, download_weights=False),
         (rand(1, size // 8, size // 8, 4),)),
    ]  # fmt: skip


def sd15_unet(size: int, batch: int, dtype=None):
    """A keras-sd SD 1.5 UNet (random weights) and one denoising call's inputs."""
    from keras_sd.models.unet import SD1_CONFIG, UNet

    latent = size // 8
    inputs = (rand(batch, latent, latent, 4), tf.fill((batch,), 500), rand(batch, 77, 768))
    return UNet(**SD1_CONFIG, dtype=dtype), inputs


def plain(model):
    """Call `model` the plain Keras way. Inside a tf.function its variables are read by
    reference; capturing `model_state` values instead would copy every weight into the
    traced graph."""
    return lambda *args: model(*args)


# Candidate replacements, measured on the whole keras-sd UNet with --ablate.
def _tanh_gelu_call(self, x, context):
    """BasicTransformerBlock with GEGLU's gelu in its tanh form (as KerasCV computes it)."""
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    value, gate = ops.split(self.ff_proj(self.norm3(x)), 2, axis=-1)
    return x + self.ff_out(value * ops.gelu(gate, approximate=True))


def _never(*args):
    return False


def _only_float32(dtype):
    return keras.backend.standardize_dtype(dtype) == "float32"


def ablations(policy: str):
    """{change: (class or module to patch or None, attribute, replacement, UNet dtype
    policy or None)}."""
    from keras_sd import backend
    from keras_sd.models import conv, transformer

    out = {
        "GroupNorm: the plain formulation instead of the fused batch-norm kernel": (
            backend, "fused_group_norm_applies", _never, None),
        "Attention: softmax of a float32 copy of the logits": (
            backend, "softmax_computes_in_float32", _only_float32, None),
        "Conv3x3: the backend's convolution instead of GEMM for large kernels": (
            conv, "GEMM_RULES", (), None),
        "GEGLU: tanh gelu instead of erf": (
            transformer.BasicTransformerBlock, "call", _tanh_gelu_call, None),
    }  # fmt: skip
    if policy.startswith("mixed_"):
        pure = policy.removeprefix("mixed_")
        out[f"weights stored in {pure} (pure '{pure}' policy)"] = (None, None, None, pure)
    return out


def calling_conventions(size: int, batch: int, repeats: int) -> None:
    """keras-sd's compiled paths against plain Keras calls of the same models.

    `bench.py` runs keras-sd as the pipeline does: weights passed as arguments
    to `backend.compile_function(backend.stateless(model))`, and the whole loop
    in one program. Here the same models are also called the plain Keras way
    (variables captured by a `tf.function`) and the loop is compared with
    separate UNet calls, alternating, to see what each convention costs.
    """
    from keras_sd import backend
    from keras_sd.models import vae
    from keras_sd.sampling import Sampler
    from keras_sd.schedulers import DDIMScheduler

    unet, (x, t, ctx) = sd15_unet(size, 2 * batch)
    print("\n| model, batch | plain Keras call s | keras-sd stateless call s | stateless / plain |")
    print("|---|---|---|---|")
    stateless = backend.compile_function(backend.stateless(unet), False)
    state = backend.model_state(unet)
    for n in (batch, 2 * batch):
        args = (x[:n], t[:n], ctx[:n])
        graphs = {"plain": traced(plain(unet), args),
                  "stateless": lambda x, t, c: stateless(state, x, t, c)}  # fmt: skip
        graphs["stateless"](*args).numpy()
        r = best_times(graphs, args, repeats)
        print(f"| UNet, {n} | {r['plain']:.3f} | {r['stateless']:.3f} | "
              f"{r['stateless'] / r['plain']:.2f} |", flush=True)  # fmt: skip
    decoder = vae.VAEDecoder(**vae.SD1_CONFIG)
    latents = (rand(batch, size // 8, size // 8, 4),)
    decode = backend.compile_function(backend.stateless(decoder), False)
    dec_state = backend.model_state(decoder)
    graphs = {"plain": traced(plain(decoder), latents),
              "stateless": lambda z: decode(dec_state, z)}  # fmt: skip
    graphs["stateless"](*latents).numpy()
    r = best_times(graphs, latents, repeats)
    print(f"| VAE decoder, {batch} | {r['plain']:.3f} | {r['stateless']:.3f} | "
          f"{r['stateless'] / r['plain']:.2f} |", flush=True)  # fmt: skip
    steps = 3
    sampler = Sampler(unet, jit_compile=False)
    noise = x[:batch]

    def loop(z, c):  # keras-sd's compiled loop: one program, 2B UNet batch per step
        return sampler(DDIMScheduler(), z, c[:batch], c[batch:], num_steps=steps)

    def separate(z, c):  # the same UNet work as separate stateless calls from Python
        for _ in range(steps):
            out = stateless(state, ops.concatenate([z, z]), t, c)
        return out

    graphs = {"loop": loop, "separate": separate}
    for g in graphs.values():
        g(noise, ctx).numpy()
    r = best_times(graphs, (noise, ctx), max(2, repeats // 2))
    print(
        f"\n{steps}-step compiled loop: {r['loop']:.3f} s; {steps} separate stateless UNet "
        f"calls: {r['separate']:.3f} s; loop / separate {r['loop'] / r['separate']:.2f}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one guided image)")
    p.add_argument("--policy", nargs="+", default=["float32", "mixed_bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ablate", action="store_true", help="time candidate changes on the UNet")
    p.add_argument("--no-pieces", action="store_true", help="only the keras-sd UNet (+ ablations)")
    p.add_argument(
        "--calls",
        action="store_true",
        help="keras-sd's stateless compiled calls and loop vs plain Keras calls",
    )
    args = p.parse_args()
    if len(args.policy) > 1:  # one process per policy: two full UNets each, freed between
        for policy in args.policy:
            argv = [a for a in sys.argv[1:] if a not in args.policy and a != "--policy"]
            subprocess.run([sys.executable, __file__, *argv, "--policy", policy], check=True)
        return
    print(f"load average at start: {os.getloadavg()}")
    from keras_sd import backend

    backend.use_pooled_host_memory()  # as the keras-sd command does
    (policy,) = args.policy
    keras.mixed_precision.set_global_policy(policy)
    print(f"\n## policy {policy}, size {args.size}, UNet batch {args.batch}\n")
    if not args.no_pieces:
        print("| piece | keras-sd s | KerasCV s | keras-sd / KerasCV |\n|---|---|---|---|")
        for name, ours, theirs, inputs in pieces(args.size, args.batch):
            graphs = {"ours": traced(ours, inputs), "theirs": traced(theirs, inputs)}
            t = best_times(graphs, inputs, args.repeats)
            print(f"| {name} | {t['ours']:.4f} | {t['theirs']:.4f} | "
                  f"{t['ours'] / t['theirs']:.2f} |", flush=True)  # fmt: skip
        gc.collect()
    if args.calls:
        calling_conventions(args.size, max(1, args.batch // 2), args.repeats)
        gc.collect()
    # The whole UNets are compared by bench.py, one process each: two full-size UNets
    # (and their low-precision weight copies) in one process need over 10 GB.
    unet, inputs = sd15_unet(args.size, args.batch)
    before = traced(plain(unet), inputs)
    print(f"\nwhole keras-sd UNet: {best_times({'x': before}, inputs, args.repeats)['x']:.3f} s")
    if not args.ablate:
        return
    print("\n| keras-sd UNet change | before s | after s | after / before |\n|---|---|---|---|")
    for name, (owner, attr, fn, dtype) in ablations(policy).items():
        patch = mock.patch.object(owner, attr, fn) if owner else contextlib.nullcontext()
        with patch:
            after = traced(plain(sd15_unet(args.size, args.batch, dtype)[0] if dtype else unet),
                           inputs)  # fmt: skip
        t = best_times({"before": before, "after": after}, inputs, args.repeats)
        print(f"| {name} | {t['before']:.3f} | {t['after']:.3f} | "
              f"{t['after'] / t['before']:.2f} |", flush=True)  # fmt: skip
        del after
        gc.collect()


if __name__ == "__main__":
    main()
