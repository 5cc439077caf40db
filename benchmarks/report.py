"""Tables and environment record for `bench.py` results (markdown)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from operator import methodcaller

import numpy as np

VERSIONS = (
    "tensorflow",
    "keras",
    "jax",
    "jaxlib",
    "torch",
    "diffusers",
    "transformers",
    "keras-cv",
    "numpy",
)


def gpus() -> list:
    """Name, memory and driver of each NVIDIA GPU (nvidia-smi), [] without one."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def environment() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024**2, 1),
        "gpus": gpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {n: version(n) for n in VERSIONS},
        "loadavg_start": os.getloadavg(),
        "command": " ".join(["python", "benchmarks/bench.py", *sys.argv[1:]]),
    }


def image_diffs(rows: list) -> None:
    """Mean |difference| (0-255) of each row's images to diffusers float32's, same case."""
    refs = {(r["size"], r["batch"]): r["images"] for r in rows if r["name"] == "diffusers/float32"}
    for r in rows:
        ref = refs.get((r["size"], r["batch"]))
        # KerasCV's sampler takes other timesteps (rounded linspace(0, 999, steps), not
        # DDIM's leading spacing), so its images differ by design on the same weights.
        if ref and not r["name"].startswith("keras-cv"):
            diff = np.load(r["images"]).astype(np.float32) - np.load(ref).astype(np.float32)
            r["image_diff"] = float(np.abs(diff).mean())


def pct(share):
    return "-" if share is None else f"{100 * share:.0f}%"


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = (
    ("variant", lambda r: r["name"]),
    ("size", lambda r: r["size"]),
    ("batch", lambda r: r["batch"]),
    ("UNet s/call (batch 2B)", lambda r: fmt(r["unet_s"], 3)),
    ("UNet s/call (batch B)", lambda r: fmt(r.get("unet_half_s"), 3)),
    ("UNet CPU s (2B)", lambda r: fmt(r.get("unet_cpu_s"), 2)),
    ("others' CPU during UNet", lambda r: pct(r.get("unet_others"))),
    ("loop s/step", lambda r: fmt(r["loop_step_s"], 3)),
    ("s/image", lambda r: fmt(r["image_s"])),
    ("others' CPU during t2i", lambda r: pct(r.get("t2i_others"))),
    ("first t2i s", lambda r: fmt(r["t2i_first_s"])),
    ("compile s", lambda r: fmt(r["compile_s"])),
    ("UNet first call s", lambda r: fmt(r.get("unet_first_s"))),
    ("encode s", lambda r: fmt(r["encode_s"], 3)),
    ("decode s", lambda r: fmt(r["decode_s"])),
    ("build+load s", lambda r: fmt(r["build_s"] + r["load_s"], 1)),
    ("case peak RSS GB", lambda r: fmt(r["case_peak_rss_gb"])),
    ("max RSS GB", lambda r: fmt(r["max_rss_gb"])),
    ("img diff vs diffusers f32", lambda r: fmt(r.get("image_diff"))),
    ("finite", lambda r: "yes" if r["unet_finite"] else "NO"),
    ("load avg", lambda r: "/".join(fmt(x, 1) for x in r["loadavg"])),
)


def table(rows: list) -> str:
    columns = list(COLUMNS)
    if any("i2i_s" in r for r in rows):
        columns.insert(10, ("img2img s/image", lambda r: fmt(r.get("i2i_image_s"))))
        columns.insert(11, ("first img2img s", lambda r: fmt(r.get("i2i_first_s"))))
    if any("gpu_peak_gb" in r for r in rows):
        columns.append(("GPU peak GB", lambda r: fmt(r.get("gpu_peak_gb"))))
        columns.append(("GPU peak before case GB", lambda r: fmt(r.get("gpu_peak_before_gb"))))
        columns.append(("GPU in use after GB", lambda r: fmt(r.get("gpu_in_use_gb"))))
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(rows, key=lambda r: (r["size"], r["batch"], r["precision"], r["name"])):
        lines.append("| " + " | ".join(str(c[1](r)) for c in columns) + " |")
    return "\n".join(lines)


RATIOS = (("unet_s", "UNet"), ("unet_cpu_s", "UNet CPU"), ("loop_step_s", "step"),
          ("image_s", "image"))  # fmt: skip


# The runtimes keras-sd is compared with: (label, whether a row's variant belongs to it).
# torch.compile rows get their own columns, so that eager diffusers stays visible.
PEERS = (
    ("diffusers", lambda name: name.startswith("diffusers/") and "/compile" not in name),
    ("diffusers torch.compile", lambda name: name.startswith("diffusers/") and "/compile" in name),
    ("KerasCV", lambda name: name.startswith("keras-cv/")),
)


def ratio_table(rows: list) -> str:
    """Other runtime's best / keras-sd's best (same case and precision): > 1 = keras-sd faster.

    One group of columns per peer that has rows (`PEERS`); diffusers and KerasCV always.
    """
    peers = [(label, belongs) for label, belongs in PEERS
             if "compile" not in label or any(belongs(r["name"]) for r in rows)]  # fmt: skip
    ratios = RATIOS + ((("i2i_image_s", "img2img"),) if any("i2i_s" in r for r in rows) else ())
    head = ["size", "batch", "precision", "keras-sd backend"]
    head += [f"{label}/keras-sd {what}" for label, _ in peers for _, what in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def best(case, belongs, key):
        pool = [r for r in rows if (r["size"], r["batch"], r["precision"]) == case
                and belongs(r["name"]) and r.get(key) is not None]  # fmt: skip
        return min(r[key] for r in pool) if pool else None

    for case in sorted({(r["size"], r["batch"], r["precision"]) for r in rows}):
        for backend in ("tf", "jax"):
            mine = methodcaller("startswith", f"keras-sd/{backend}/")
            ours = {key: best(case, mine, key) for key, _ in ratios}
            if ours["unet_s"] is None:
                continue
            cells = [*case, backend]
            for _, belongs in peers:
                for key, _ in ratios:
                    theirs = best(case, belongs, key)
                    cells.append(fmt(theirs / ours[key]) if theirs and ours[key] else "-")
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def startup_table(startup: dict) -> str:
    lines = [
        "| runtime | how | import s | build s | load s | build+load s | max RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in startup.items():
        if key.startswith("cli"):
            continue
        name = r["runtime"]
        if "error" in r:
            lines.append(f"| {name} | FAILED: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['how']} | {fmt(r['import_s'], 1)} | {fmt(r['build_s'], 1)} | "
            f"{fmt(r['load_s'], 1)} | {fmt(r['build_load_s'], 1)} | "
            f"{fmt(r['max_rss_gb'])} |"
        )
    for key, when in (
        ("cli", "compiling"),
        ("cli-cached", "again, programs from its cache"),
        ("cli-diffusers", "diffusers, the same image from the same folder"),
    ):
        if key not in startup:
            continue
        cli = startup[key]
        lines.append("")
        lines.append(
            f"`{cli['command']}` ({when}): progress bar (loop starts) after "
            f"{fmt(cli.get('loop_start_s'), 1)} s, first denoising step done after "
            f"{fmt(cli.get('first_step_s'), 1)} s, exit after {fmt(cli['exit_s'], 1)} s"
            + (f"; FAILED: {cli['error']}" if "error" in cli else "")
        )
    return "\n".join(lines)
