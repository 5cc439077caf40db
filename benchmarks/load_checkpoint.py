"""Time and peak memory of loading a full-size single-file SD checkpoint (issue 4, point 6).

    python benchmarks/load_checkpoint.py --make /tmp/sd15-random.safetensors
    python benchmarks/load_checkpoint.py --path v1-5-pruned-emaonly.safetensors --repeats 3

Compares, each in a fresh subprocess (so peak RSS is per run) and with the file
already in the page cache (one untimed read first):
  safetensors  `safetensors.numpy.load_file(path)`: reading the tensors, nothing else
  keras-sd     `keras_sd.StableDiffusion.from_checkpoint(path)`: a ready `StableDiffusion`
Targets: keras-sd time <= 1.5x safetensors, keras-sd peak RSS < 2x the file size.
Runs alternate, and each pair's ratio is printed too: on VMs whose cost of new memory
changes from minute to minute, a pair sees one state of it.
`--make` writes seeded random SD 1.5 weights in the CompVis layout, float32, the
size of v1-5-pruned-emaonly.safetensors. Figures are measured, never estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

# Runs in the child: import first (not timed), then time the load, report peak RSS.
_CHILD = """
import json, os, resource, sys, time
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
path, what = sys.argv[1], sys.argv[2]
if what == "safetensors":
    from safetensors.numpy import load_file as load
else:
    from keras_sd import StableDiffusion, backend

    backend.use_pooled_host_memory()  # as the keras-sd command does
    load = StableDiffusion.from_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
result = load(path)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss": peak, "rss_before": before}))
"""


def run(path: str, what: str) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, path, what],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def make(path: str) -> None:
    """Write seeded random full-size SD 1.5 weights (float32, CompVis layout)."""
    sys.path.insert(0, SRC)
    import numpy as np

    from keras_sd.presets import resolve_model_config
    from keras_sd.weights import deferred, safetensors_io
    from keras_sd.weights.checkpoint import export_parts_lazy
    from keras_sd.weights.compvis import diffusers_to_compvis

    models = deferred.build_models_deferred(resolve_model_config("sd1"))
    parts = export_parts_lazy(models)
    rng = np.random.default_rng(0)

    def random(tensor):
        shape, dtype = tensor.shape, tensor.dtype
        values = lambda: rng.standard_normal(shape, np.float32) * 0.02  # noqa: E731
        return safetensors_io.LazyTensor(values, shape, dtype)

    parts = {c: {k: random(t) for k, t in s.items()} for c, s in parts.items()}
    safetensors_io.write_safetensors(path, diffusers_to_compvis(parts, "sd1"))
    deferred.forget_deferred(models.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", help="an existing single-file checkpoint")
    parser.add_argument("--make", metavar="PATH", help="write random SD 1.5 weights here first")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = args.path or args.make
    if not path:
        parser.error("give --path or --make")
    if args.make and not os.path.exists(args.make):
        make(args.make)
    size = os.path.getsize(path)
    run(path, "safetensors")  # warm the page cache
    results = {"safetensors": [], "keras-sd": []}
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        for what in results:
            results[what].append(run(path, what))
    print(f"checkpoint: {path} ({size / 1e9:.2f} GB)")
    print(f"{'reader':<12} {'median s':>9} {'runs s':>22} {'peak RSS GB':>12} {'x file':>7}")
    summary = {}
    for what, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        peak = max(r["peak_rss"] for r in runs)
        summary[what] = {"median_seconds": statistics.median(seconds), "peak_rss": peak}
        shown = ", ".join(f"{s:.2f}" for s in seconds)
        print(
            f"{what:<12} {statistics.median(seconds):>9.2f} {shown:>22} "
            f"{peak / 1e9:>12.2f} {peak / size:>7.2f}"
        )
    ratio = summary["keras-sd"]["median_seconds"] / summary["safetensors"]["median_seconds"]
    print(f"time ratio keras-sd / safetensors: {ratio:.2f} (target <= 1.5)")
    # Each pair ran back to back, so its ratio sees one state of the machine's memory.
    paired = zip(results["safetensors"], results["keras-sd"], strict=True)
    pairs = [k["seconds"] / s["seconds"] for s, k in paired]
    summary["pair_ratios"] = pairs
    met = sum(r <= 1.5 for r in pairs)
    shown = ", ".join(f"{r:.2f}" for r in pairs)
    middle = statistics.median(pairs)
    print(f"per-pair ratios: {shown} (median {middle:.2f}, {met}/{len(pairs)} <= 1.5)")
    print(
        f"keras-sd peak RSS / file size: {summary['keras-sd']['peak_rss'] / size:.2f} (target < 2)"
    )
    print(json.dumps({"file_bytes": size, "time_ratio": ratio, **summary}))


if __name__ == "__main__":
    main()
