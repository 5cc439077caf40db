"""Speed of keras-sd vs diffusers (PyTorch) and KerasCV, side by side in one run.

    python benchmarks/bench.py --sizes 256 512 --steps 3 --precision float32 bfloat16
    python benchmarks/bench.py --tiny --sizes 64 --steps 1     # smoke run, a few minutes
    python benchmarks/bench.py --gpu                           # 512 px, 50 DDIM steps, fp16
    python benchmarks/bench.py --img2img --runtimes keras-sd-tf diffusers  # + image_to_image

One shared set of seeded random SD 1.5 weights is written once as a diffusers
folder (cached); keras-sd (TensorFlow and JAX backends) and diffusers load it, and
KerasCV (which has no diffusers reader) gets the same values copied in through
keras-sd's KerasCV weight order. Every runtime/precision runs in its own subprocess
(`runners.py`) so backends, thread pools and peak memory stay separate. Figures
are measured wall-clock times; this script never estimates one, and nothing
here gates CI. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from report import environment, image_diffs, ratio_table, startup_table, table

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
RUNTIMES = ("keras-sd-tf", "keras-sd-jax", "diffusers", "keras-cv", "keras-cv-jax")
PRECISIONS = ("float32", "bfloat16", "float16")

# Diffusers-side configurations of the shared weights (SD 1.5's published configs).
_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
SD15 = {
    "unet": {
        "sample_size": 64,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 512,
    },
    "text_encoder": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "scheduler": _SCHEDULER,
    "max_length": 77,
}
TINY = {
    "unet": {
        "sample_size": 32,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": 2,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
    },
    "vae": {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "sample_size": 64,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
    "scheduler": _SCHEDULER,
    "max_length": 77,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256], help="image side, pixels")
    p.add_argument("--steps", type=int, default=3, help="DDIM steps per image")
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="images per call (default 1; 1 4 with --gpu)",
    )
    p.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=None,
        help="default: float32 bfloat16 (float32 only with --tiny)",
    )
    p.add_argument(
        "--runtimes",
        nargs="+",
        choices=RUNTIMES,
        default=None,
        help="default: all but keras-cv-jax (KerasCV on Keras 3's JAX backend, for "
        "machines without TensorFlow); with --tiny no KerasCV (it has no tiny config)",
    )
    p.add_argument("--only", nargs="+", default=None, help="keep variants whose name has one")
    p.add_argument("--skip", nargs="+", default=[], help="drop variants whose name has one")
    p.add_argument(
        "--keras-sd-xla",
        action="store_true",
        help="add keras-sd TensorFlow rows with jit_compile=True",
    )
    p.add_argument(
        "--keras-sd-graph",
        action="store_true",
        help="add keras-sd TensorFlow rows with jit_compile=False (a plain graph)",
    )
    p.add_argument(
        "--conv-direct",
        action="store_true",
        help="add keras-sd rows with every convolution direct (`/direct-conv`: no "
        "Winograd, see keras_sd.models.conv.set_conv_algorithm)",
    )
    p.add_argument("--torch-compile", action="store_true", help="add diffusers torch.compile rows")
    p.add_argument(
        "--tf-allocators",
        action="store_true",
        help="add TensorFlow rows with the other CPU allocator: keras-sd with TensorFlow's "
        "default one (`/tf-default-alloc`), KerasCV with the pooling one keras-sd's "
        "workers request (`/pooled`)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke run)")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="GPU settings: 512 px, 50 steps, batch 1 and 4, float16, torch.compile",
    )
    p.add_argument("--repeats", type=int, default=3, help="warm UNet calls timed (best of)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant this many times, alternating, and keep the best: "
        "spreads each variant's samples over the run on a busy machine",
    )
    p.add_argument("--t2i-repeats", type=int, default=1, help="warm text_to_image calls timed")
    p.add_argument(
        "--img2img",
        action="store_true",
        help="also time image_to_image (keras-sd) and StableDiffusionImg2ImgPipeline "
        "(diffusers) on a fixed image, as many warm calls as --t2i-repeats",
    )
    p.add_argument(
        "--strength", type=float, default=0.5, help="image_to_image strength (--img2img)"
    )
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--startup",
        action="store_true",
        help="also time import/build/load vs diffusers and `keras-sd generate` "
        "to its first denoising step",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        help="results.json of earlier runs (same settings): their rows join this "
        "run's, best of each measurement kept, e.g. to rerun a noisy variant",
    )
    p.add_argument("--weights-dir", default=None, help="shared weights folder (cached)")
    p.add_argument("--out-dir", default=None, help="logs, images, results.json, table.md")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    args = p.parse_args(argv)
    if args.gpu:
        args.sizes, args.steps = [512], 50
        args.batch = args.batch or [1, 4]
        args.precision, args.torch_compile = ["float16"], True
    args.batch = args.batch or [1]
    if args.precision is None:
        args.precision = ["float32"] if args.tiny else ["float32", "bfloat16"]
    if args.runtimes is None:
        args.runtimes = [r for r in RUNTIMES[:-1] if not (args.tiny and r == "keras-cv")]
    return args


def variants(args) -> list[dict]:
    """Every (runtime, precision, compile mode) to run, as worker specs."""
    out = []
    policies = {
        "float32": ["float32"],
        "bfloat16": ["mixed_bfloat16", "bfloat16"],
        "float16": ["mixed_float16"],
    }
    for precision in args.precision:
        for backend in ("tf", "jax"):
            if f"keras-sd-{backend}" not in args.runtimes:
                continue
            for policy in policies[precision]:
                jits = ["auto"]
                if backend == "tf":
                    jits += [True] * args.keras_sd_xla + [False] * args.keras_sd_graph
                for jit in jits:
                    out.append(
                        {
                            "runtime": "keras-sd",
                            "precision": precision,
                            "policy": policy,
                            "jit": jit,
                            "backend": backend,
                            "name": f"keras-sd/{backend}/{policy}"
                            + "/xla" * (jit is True)
                            + "/graph" * (jit is False),
                        }
                    )
                    row = out[-1]
                    if backend == "tf" and args.tf_allocators and jit == "auto":
                        out.append(with_allocator(row, "false", "/tf-default-alloc"))
                    if args.conv_direct and jit == "auto":
                        direct = {"conv_algorithm": "direct", "name": row["name"] + "/direct-conv"}
                        out.append({**row, **direct})
        if "diffusers" in args.runtimes:
            for compiled in [False, True] if args.torch_compile else [False]:
                out.append(
                    {
                        "runtime": "diffusers",
                        "precision": precision,
                        "dtype": precision,
                        "torch_compile": compiled,
                        "half_batch": not compiled,
                        "name": f"diffusers/{precision}" + "/compile" * compiled,
                    }
                )
        if "keras-cv-jax" in args.runtimes:
            # On JAX every call is an XLA program: one row per policy.
            for policy in policies[precision]:
                out.append(
                    {
                        "runtime": "keras-cv",
                        "precision": precision,
                        "policy": policy,
                        "jit": True,
                        "backend": "jax",
                        "name": f"keras-cv/jax/{policy}",
                    }
                )
        if "keras-cv" in args.runtimes:
            # KerasCV compiles with XLA by default; on CPU its plain graph can win (in
            # bfloat16 it did on both CPUs measured, with and without native bfloat16).
            jits = (True,) if precision == "float16" else (True, False)
            for policy, jit in ((p, j) for p in policies[precision] for j in jits):
                row = {
                    "runtime": "keras-cv",
                    "precision": precision,
                    "policy": policy,
                    "jit": jit,
                    "name": f"keras-cv/{policy}" + "/xla" * jit,
                }
                # Explicit: TensorFlow's default allocator, whatever the caller's env says.
                out.append(with_allocator(row, "false", ""))
                if args.tf_allocators:
                    out.append(with_allocator(row, "true", "/pooled"))
    keep = [v for v in out if not any(s in v["name"] for s in args.skip)]
    if args.only:
        keep = [v for v in keep if any(s in v["name"] for s in args.only)]
    return keep


def with_allocator(variant: dict, pooled: str, suffix: str) -> dict:
    """`variant` run with `TF_CPU_ALLOCATOR_USE_BFC=pooled` (see
    `keras_sd.backend.use_pooled_host_memory`)."""
    env = {**variant.get("env", {}), "TF_CPU_ALLOCATOR_USE_BFC": pooled}
    return {**variant, "env": env, "name": variant["name"] + suffix}


# ------------------------------------------------------------------ workers
def worker_env(backend: str | None = None, extra: dict | None = None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH")]))
    if backend:
        env["KERAS_BACKEND"] = {"tf": "tensorflow", "jax": "jax"}[backend]
    return env


def run_worker(spec: dict, out_dir: str, timeout: int, backend=None) -> tuple[list, str | None]:
    """Run one worker process; returns (its result rows, an error line or None)."""
    tag = spec["name"].replace("/", "_")
    spec = {**spec, "results": os.path.join(out_dir, f"{tag}.jsonl"), "out_dir": out_dir}
    if os.path.exists(spec["results"]):  # left by an earlier round
        os.remove(spec["results"])
    spec_path = os.path.join(out_dir, f"{tag}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    log_path = os.path.join(out_dir, f"{tag}.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "runners.py"), spec_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_env(backend, spec.get("env")),
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = f"timeout after {timeout} s"
    rows = []
    if os.path.exists(spec["results"]):
        with open(spec["results"]) as f:
            rows = [json.loads(line) for line in f]
    error = None
    if code != 0:
        with open(log_path) as f:
            lines = [line.strip() for line in f if line.strip()]
        error = f"exit {code}: {lines[-1] if lines else ''} (log: {log_path})"
    print(
        f"  {spec['name']}: {time.perf_counter() - start:.0f} s"
        + (f"  FAILED {error}" if error else ""),
        file=sys.stderr,
        flush=True,
    )
    return rows, error


# Figures that belong to one timed sample: kept from the round whose time was best.
PAIRED = {"unet_cpu_s": "unet_s", "unet_others": "unet_s", "unet_half_cpu_s": "unet_half_s",
          "t2i_cpu_s": "t2i_s", "t2i_others": "t2i_s"}  # fmt: skip


def best_of_rounds(rows: list) -> list:
    """One row per (variant, case): the best time of each measurement over the rounds."""
    merged = {}
    for row in rows:
        key = (row["name"], row["size"], row["batch"])
        if key not in merged:
            merged[key] = {**row, "rounds": 1, "loadavg": [row["loadavg"]]}
            continue
        best = merged[key]
        best["rounds"] += 1
        best["loadavg"].append(row["loadavg"])
        for k, time_key in PAIRED.items():
            if row.get(time_key) is not None and row[time_key] < best[time_key]:
                best[k] = row.get(k)
        for k, v in row.items():
            if k in PAIRED or v is None:
                continue
            if k.endswith("_all_s"):
                best[k] = best[k] + v
            elif k.endswith("_s"):
                best[k] = v if best.get(k) is None else min(best[k], v)
            elif k.endswith("_gb"):
                best[k] = max(best[k], v)
    for r in merged.values():  # derived figures, recomputed from the merged ones
        r["loop_step_s"] = (r["t2i_s"] - r["decode_s"] - r["encode_s"]) / r["steps"]
        r["image_s"] = r["t2i_s"] / r["batch"]
        r["compile_s"] = r["t2i_first_s"] - r["t2i_s"]
        if r.get("i2i_s") is not None:
            r["i2i_image_s"] = r["i2i_s"] / r["batch"]
    return list(merged.values())


def ensure_weights(args, out_dir: str) -> str:
    configs = TINY if args.tiny else SD15
    folder = args.weights_dir or os.path.join(
        tempfile.gettempdir(),
        "keras-sd-bench",
        f"{'tiny' if args.tiny else 'sd15'}-seed{args.seed}",
    )
    marker = os.path.join(folder, "bench_weights.json")
    stamp = {"configs": configs, "seed": args.seed}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == stamp:
                return folder
    print(f"writing random weights to {folder}", file=sys.stderr, flush=True)
    spec = {"name": "weights", "runtime": "weights", "weights": folder, **stamp}
    _, error = run_worker(spec, out_dir, 3600)
    if error:
        raise SystemExit(f"could not write the shared weights: {error}")
    with open(marker, "w") as f:
        json.dump(stamp, f)
    return folder


# ------------------------------------------------------------------ start-up
def time_cli(args, folder: str, out_dir: str, cache: str) -> dict:
    """Seconds from launching `keras-sd generate` to its progress bar and first step.

    Read live from the command's tqdm bar on stderr: "0/N" means text encoding
    is done and the loop is starting, "1/N" that the first step finished
    (compilation included). `cache` is the command's `--compile-cache` folder.
    """
    size = args.sizes[0]
    cmd = [
        sys.executable,
        "-m",
        "keras_sd.cli",
        "generate",
        STARTUP_PROMPT,
        "--checkpoint",
        folder,
        "--steps",
        "2",
        "--width",
        str(size),
        "--height",
        str(size),
        "--seed",
        "0",
        "--compile-cache",
        cache,
        "-o",
        os.path.join(out_dir, "cli.png"),
    ]
    marks = time_first_step(cmd, worker_env("tf"), rb"denoising:[^\r\n]*", args.timeout)
    marks["command"] = " ".join(["keras-sd", *cmd[3:]])
    return marks


STARTUP_PROMPT = "an astronaut riding a horse"
# The same job in diffusers: a fresh process that loads the folder and makes one image.
DIFFUSERS_IMAGE = """
import sys, torch
from diffusers import StableDiffusionPipeline
folder, prompt, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pipe = StableDiffusionPipeline.from_pretrained(
    folder, safety_checker=None, requires_safety_checker=False
)
image = pipe(prompt, num_inference_steps=2, height=size, width=size,
             generator=torch.manual_seed(0)).images[0]
image.save(out)
"""


def time_diffusers_image(args, folder: str, out_dir: str) -> dict:
    """`time_cli`'s figures for diffusers: launching a Python process that loads the
    folder with `StableDiffusionPipeline.from_pretrained` and makes the same image,
    read from the pipeline's own tqdm bar ("0/2" loop starting, "1/2" first step). That
    bar is the one without a description; the loading bars have one."""
    size = str(args.sizes[0])
    cmd = [sys.executable, "-c", DIFFUSERS_IMAGE, folder, STARTUP_PROMPT, size]
    cmd.append(os.path.join(out_dir, "diffusers.png"))
    bar = rb"(?:^|[\r\n])\s*\d+%\|[^|\r\n]*\|"
    marks = time_first_step(cmd, worker_env(), bar, args.timeout)
    marks["command"] = "python -c <from_pretrained, then one 2-step image>"
    return marks


def time_first_step(cmd: list, env: dict, bar: bytes, timeout: float) -> dict:
    """Seconds from launching `cmd` to the first sight of its tqdm progress bar at 0
    steps and at 1 step, and to its exit. `bar`: what precedes the step count in the
    bar's text (a regex); the bar is read live from the process's stderr."""
    marks = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    text = b""

    def read():
        nonlocal text
        while chunk := os.read(proc.stderr.fileno(), 4096):
            text += chunk
            now = time.perf_counter() - start
            if re.search(bar + rb"\s*0/\d+", text):
                marks.setdefault("loop_start_s", now)
            if re.search(bar + rb"[^\r\n]*\b1/\d+", text):
                marks.setdefault("first_step_s", now)

    reader = threading.Thread(target=read)
    reader.start()
    code = proc.wait(timeout=timeout)
    reader.join()
    marks["exit_s"] = time.perf_counter() - start
    if code:
        tail = text.decode(errors="replace").strip().splitlines()
        marks["error"] = tail[-1] if tail else f"exit {code}"
    return marks


def converted_file(folder: str, layout: str, timeout: float) -> str:
    """The same weights as one `.safetensors` file in `layout` ("keras" or "compvis"),
    written once next to `folder` (`keras-sd convert --layout LAYOUT`, untimed)."""
    path = folder.rstrip(os.sep) + f"-{layout}.safetensors"
    marker = os.path.join(folder, "bench_weights.json")  # rewritten with new weights
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(marker):
        print(f"writing {path}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "keras_sd.cli", "convert", folder, path, "--layout", layout]
        subprocess.run(cmd, check=True, env=worker_env("tf"), timeout=timeout)
    return path


def run_startup(args, folder: str, out_dir: str) -> dict:
    keras_file = converted_file(folder, "keras", args.timeout)
    single_file = converted_file(folder, "compvis", args.timeout)
    runs = [
        ("keras-sd (tensorflow)", "startup-keras-sd", "tf", folder),
        ("keras-sd (jax)", "startup-keras-sd", "jax", folder),
        ("diffusers", "startup-diffusers", None, folder),
        ("keras-sd (tensorflow), single file", "startup-keras-sd", "tf", single_file),
        ("keras-sd (jax), single file", "startup-keras-sd", "jax", single_file),
        ("diffusers, single file", "startup-diffusers", None, single_file),
        ("keras-sd (tensorflow), keras-layout file", "startup-keras-sd", "tf", keras_file),
        ("keras-sd (jax), keras-layout file", "startup-keras-sd", "jax", keras_file),
    ]
    sources = {folder: "folder", single_file: "single file", keras_file: "keras-layout file"}
    out = {}
    for name, runtime, backend, weights in runs:
        tag = re.sub(r"\W+", "-", f"startup {name}").strip("-")
        spec = {"name": tag, "runtime": runtime, "weights": weights, "source": sources[weights]}
        spec["config"] = folder  # the json configs, for diffusers' single-file loader
        rows, error = run_worker(spec, out_dir, args.timeout, backend=backend)
        out[tag] = {"runtime": name, **(rows[0] if rows else {"error": error})}
    # The command twice with one new compile cache: compiling, then loading the programs.
    cache = tempfile.mkdtemp(prefix="compile-cache-", dir=out_dir)
    out["cli"] = time_cli(args, folder, out_dir, cache)
    out["cli-cached"] = time_cli(args, folder, out_dir, cache)
    out["cli-diffusers"] = time_diffusers_image(args, folder, out_dir)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = args.out_dir or os.path.join(
        tempfile.gettempdir(), "keras-sd-bench", time.strftime("run-%Y%m%d-%H%M%S")
    )
    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    folder = ensure_weights(args, out_dir)
    cases = [{"id": f"{s}px-b{b}", "size": s, "batch": b} for s in args.sizes for b in args.batch]
    rows, errors = [], {}
    for _ in range(args.rounds):
        for variant in variants(args):
            spec = {
                **variant,
                "cases": cases,
                "weights": folder,
                "steps": args.steps,
                "repeats": args.repeats,
                "t2i_repeats": args.t2i_repeats,
                "guidance": args.guidance,
                "seed": args.seed,
                "half_batch": variant.get("half_batch", True),
                "img2img_strength": args.strength if args.img2img else None,
            }
            got, error = run_worker(spec, out_dir, args.timeout, variant.get("backend"))
            rows += [{**r, "precision": variant["precision"]} for r in got]
            if error:
                errors[variant["name"]] = error
    for path in args.merge:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                if row["steps"] != args.steps:
                    raise SystemExit(f"--merge {path}: ran {row['steps']} steps, not {args.steps}")
                loads = row["loadavg"] if isinstance(row["loadavg"], list) else [row["loadavg"]]
                rows += [{**row, "loadavg": load} for load in loads[:1]]
    rows = best_of_rounds(rows)
    image_diffs(rows)
    startup = run_startup(args, folder, out_dir) if args.startup else None
    env["loadavg_end"] = os.getloadavg()
    lines = [
        f"# keras-sd benchmark ({'tiny' if args.tiny else 'SD 1.5'} config, random weights)",
        "",
        f"`{env['command']}`",
        "",
        "```",
        json.dumps(env, indent=1),
        "```",
        "",
        f"{args.steps} DDIM steps, guidance {args.guidance}, weights: {folder}",
        "",
        table(rows),
        "",
        "Ratios (other / keras-sd; > 1 means keras-sd is faster):",
        "",
        ratio_table(rows),
    ]
    if startup:
        lines += ["", "Start-up:", "", startup_table(startup)]
    if errors:
        lines += ["", "Failed workers:", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(
            {"environment": env, "rows": rows, "startup": startup, "errors": errors}, f, indent=1
        )
    print(f"\nresults: {out_dir}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
