"""Which oneDNN kernels keras-sd's UNet call runs on this CPU, and how long each takes.

    python benchmarks/onednn_ops.py --policy bfloat16 --size 256

Builds the SD 1.5 UNet (random weights) under `--policy`, calls it the way the sampler
does (`compile_function(stateless(unet), False)`: TensorFlow's plain graph, weights as
arguments), and reruns this script in a child process with
`ONEDNN_VERBOSE=profile_exec`, which makes oneDNN print one line per primitive it runs
(kind, implementation: `..._amx` where AMX is used, shapes, milliseconds). The lines of
the last call are summed by kind of work and by primitive. The child's times include
the verbose printing; compare them with each other, not with bench.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

MARK = "=====last call"


def call_unet(policy: str, size: int, batch: int) -> None:
    """Time warm UNet calls, then mark the start of the last one on stdout."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_sd import backend
    from keras_sd.models.unet import SD1_CONFIG, UNet

    backend.use_pooled_host_memory()  # as the keras-sd command does
    keras.mixed_precision.set_global_policy(policy)
    unet = UNet(**SD1_CONFIG)
    dtype = keras.config.dtype_policy().compute_dtype
    latent = size // 8
    x = tf.constant(np.random.default_rng(0).standard_normal((batch, latent, latent, 4)), dtype)
    ctx = tf.constant(np.random.default_rng(1).standard_normal((batch, 77, 768)), dtype)
    args = (backend.model_state(unet), x, tf.fill((batch,), 500), ctx)
    call = backend.compile_function(backend.stateless(unet), False)
    call(*args).numpy()
    start = time.perf_counter()
    call(*args).numpy()
    print(f"warm call {time.perf_counter() - start:.3f} s, load {os.getloadavg()}", flush=True)
    print(MARK, flush=True)
    call(*args).numpy()


def kind_of(kind: str, shape: str) -> str:
    """A readable kind of work for one primitive line."""
    if kind == "matmul":
        if shape.startswith(("1x", "2x", "4x", "8x")) and shape.count("x") > 2:
            return "batched matmuls (attention)"
        inner = int(shape.split(":")[0].split("x")[1])
        # gemm_conv3x3's products have 9 x Cin rows in their weight.
        return "3x3 convolutions as GEMM" if inner % 9 == 0 and inner >= 2880 else "dense (matmul)"
    if kind == "reorder":
        weight = shape.count("x") == 3 and not shape.startswith(("1x", "2x"))
        return "convolution weight re-layout" if weight else "activation re-layout"
    if kind == "convolution":
        return "direct 3x3 convolutions" if "kh3" in shape else "direct 1x1 convolutions"
    return kind


def summarize(lines, top: int) -> None:
    """Print milliseconds by kind of work and the `top` primitives of the verbose `lines`."""
    by_kind, by_primitive, count = (collections.Counter() for _ in range(3))
    for line in lines:
        fields = line.split(",")
        if "_verbose" not in line or len(fields) < 8 or fields[3] != "exec":
            continue
        kind, impl, shape, ms = fields[5], fields[6], fields[-2], float(fields[-1])
        by_kind[kind_of(kind, shape)] += ms
        by_primitive[(kind, impl, shape)] += ms
        count[(kind, impl, shape)] += 1
    print(f"\noneDNN total {sum(by_kind.values()):.1f} ms\n\n| kind of work | ms |\n|---|---|")
    for name, ms in by_kind.most_common():
        print(f"| {name} | {ms:.1f} |")
    print("\n| primitive | implementation | shape | calls | ms |\n|---|---|---|---|---|")
    for (kind, impl, shape), ms in by_primitive.most_common(top):
        print(f"| {kind} | {impl} | {shape} | {count[(kind, impl, shape)]} | {ms:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="bfloat16")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one guided image)")
    p.add_argument("--top", type=int, default=30, help="primitives listed")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        call_unet(args.policy, args.size, args.batch)
        return
    env = {**os.environ, "ONEDNN_VERBOSE": "profile_exec", "TF_CPP_MIN_LOG_LEVEL": "2"}
    argv = [sys.executable, __file__, "--child", "--policy", args.policy,
            "--size", str(args.size), "--batch", str(args.batch)]  # fmt: skip
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    before, _, last = out.partition(MARK)
    print(next(line for line in before.splitlines() if line.startswith("warm call")))
    summarize(last.splitlines(), args.top)


if __name__ == "__main__":
    main()
