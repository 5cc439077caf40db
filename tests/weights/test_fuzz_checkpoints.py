"""Fuzzing the checkpoint readers: every mutated file loads or is refused with a
CheckpointError, within 5 s and 1 GiB of memory beyond the loader's own.

Several hundred files are derived from small valid ones (a safetensors state dict, torch
zip and legacy pickles, a keras-layout file): truncations, byte flips, safetensors header
edits (offsets, dtypes, shapes, metadata), pickle opcode mutations, zip entry edits and
keras-layout config edits. A child process loads them one after another under
`resource.setrlimit` and a per-case alarm; the parent restarts it past a case that kills
it. Run this file as a script to load a list of cases (the child's side).
"""

import json
import os
import random
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import checkpoint_mutations as mt
import numpy as np
import torch_files as tf

SEED = int(os.environ.get("KERAS_SD_FUZZ_SEED", "0"))
CASE_SECONDS = 5
EXTRA_MEMORY = 1 << 30


# ---------------------------------------------------------------- the child's side
class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _load(kind: str, path: str) -> None:
    from keras_sd.weights import native
    from keras_sd.weights.checkpoint import checkpoint_kwargs
    from keras_sd.weights.safe_pickle import load_state_dict_file
    from keras_sd.weights.safetensors_io import read_safetensors

    if kind == "state":
        for value in load_state_dict_file(path).values():
            np.asarray(value).sum()
    elif kind == "keras-reader":
        tensors, metadata = read_safetensors(path)
        native.read_pipeline_metadata(metadata)
        for tensor in tensors.values():
            tensor.read()
    elif kind == "compvis":  # what weights cannot show comes from the micro config
        config = json.loads((Path(path).parent / "micro-config.json").read_text())
        checkpoint_kwargs(path, config=config)
    else:
        checkpoint_kwargs(path)


def _child(case_file: str, start: int, warmup: str) -> None:
    from keras_sd.weights.state_dict import CheckpointError

    _load("full", warmup)  # the backend's own start-up allocations come before the limit
    with open("/proc/self/statm") as f:
        virtual = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (virtual + EXTRA_MEMORY, resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _alarm)
    cases = json.loads(Path(case_file).read_text())
    for index in range(start, len(cases)):
        kind, path, what = cases[index]
        began = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            _load(kind, path)
            outcome = "loaded"
        except _Timeout:
            outcome = "timeout"
        except CheckpointError as err:
            outcome = "memory-limit" if "more memory" in str(err) else "refused"
        except BaseException as err:  # what the test counts as an escape
            outcome = f"escaped {type(err).__name__}: {str(err)[:300]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        seconds = time.perf_counter() - began
        print(json.dumps([index, outcome, round(seconds, 3)]), flush=True)


# ---------------------------------------------------------------- the files
def _safetensors_bytes(entries: dict, metadata: dict | None = None) -> bytes:
    header, data = {}, b""
    for name, (tag, shape, raw) in entries.items():
        header[name] = {
            "dtype": tag,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _base_files(folder: Path) -> dict:
    rng = np.random.default_rng(SEED)
    arrays = {
        "a.weight": rng.normal(size=(4, 3)).astype("float32"),
        "a.bias": rng.normal(size=(4,)).astype("float16"),
        "b.weight": rng.normal(size=(2, 2, 3, 3)).astype("float32"),
        "steps": np.arange(3, dtype="int64"),
    }
    st = _safetensors_bytes(
        {
            "a.weight": ("F32", [4, 3], arrays["a.weight"].tobytes()),
            "a.bias": ("F16", [4], arrays["a.bias"].tobytes()),
            "c.bf16": ("BF16", [2, 3], rng.integers(0, 2**16, 6, dtype="<u2").tobytes()),
            "d.bool": ("BOOL", [3], bytes([1, 0, 1])),
        },
        {"format": "pt"},
    )
    pickle_bytes, blobs = tf.state_dict_pickle(arrays)
    tf.write_zip(folder / "base.ckpt", pickle_bytes, blobs)
    floats = {k: v.astype("float32") for k, v in arrays.items()}
    legacy_pickle, legacy_blobs = tf.state_dict_pickle(floats, legacy=True)
    tf.write_legacy(folder / "base.pt", legacy_pickle, legacy_blobs)
    return {
        "safetensors": st,
        "zip": ((folder / "base.ckpt").read_bytes(), pickle_bytes, blobs),
        "legacy": ((folder / "base.pt").read_bytes(), legacy_pickle, legacy_blobs),
    }


def _micro_keras_file(path: Path) -> None:
    from keras_sd import StableDiffusion, presets
    from keras_sd.weights.checkpoint import save_checkpoint

    config = presets.resolve_model_config("tiny")
    config["text_encoder"].update(
        vocab_size=64, hidden_dim=8, num_heads=2, intermediate_dim=8, num_layers=1, max_length=8
    )
    small = {"block_out_channels": (8, 8), "norm_num_groups": 4}
    config["unet"].update(small, layers_per_block=1, cross_attention_dim=8)
    config["vae"].update(small)
    sd = StableDiffusion(img_width=16, img_height=16, jit_compile=False, config=config)
    save_checkpoint(sd, path, layout="keras")
    save_checkpoint(sd, path.with_name("compvis.safetensors"))
    path.with_name("micro-config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------- the cases
def _cases(folder: Path) -> list:
    """`[(loader kind, path, mutation family)]`, at least 500 of them."""
    from keras_sd.weights import safetensors_io

    rng = random.Random(SEED)
    base = _base_files(folder)
    keras_path = folder / "keras.safetensors"
    _micro_keras_file(keras_path)
    cases = [
        ("state", str(folder / "base.ckpt"), "baseline"),
        ("state", str(folder / "base.pt"), "baseline"),
        ("full", str(keras_path), "baseline"),
    ]
    (folder / "base.safetensors").write_bytes(base["safetensors"])
    cases.append(("state", str(folder / "base.safetensors"), "baseline"))

    def add(kind, suffix, family, data=None, write=None):
        path = folder / f"{len(cases):04d}-{family}{suffix}"
        if write is None:
            path.write_bytes(data)
        else:
            write(path)
        cases.append((kind, str(path), family))

    st = base["safetensors"]
    for family, count, mutate in [
        ("truncation", 40, mt.truncate),
        ("byte flips", 40, mt.flip),
        ("safetensors header", 90, mt.header_edit),
    ]:
        for _ in range(count):
            add("state", ".safetensors", family, mutate(st, rng))
    zip_bytes, zip_pickle, zip_blobs = base["zip"]
    for family, count, mutate in [
        ("truncation", 30, mt.truncate),
        ("byte flips", 30, mt.flip),
        ("zip entry", 40, mt.zip_edit),
    ]:
        for _ in range(count):
            add("state", ".ckpt", family, mutate(zip_bytes, rng))
    for _ in range(90):
        edited = mt.pickle_edit(zip_pickle, rng)
        add(
            "state",
            ".ckpt",
            "pickle opcodes",
            write=lambda p, e=edited: tf.write_zip(p, e, zip_blobs),
        )
    for _ in range(20):
        add(
            "state",
            ".ckpt",
            "zip entry",
            write=lambda p: mt.rezip(p, zip_pickle, zip_blobs, rng),
        )
    legacy_bytes, legacy_pickle, legacy_blobs = base["legacy"]
    for family, count, mutate in [
        ("truncation", 20, mt.truncate),
        ("byte flips", 20, mt.flip),
    ]:
        for _ in range(count):
            add("state", ".pt", family, mutate(legacy_bytes, rng))
    for _ in range(60):
        edited = mt.pickle_edit(legacy_pickle, rng)
        add(
            "state",
            ".pt",
            "pickle opcodes",
            write=lambda p, e=edited: tf.write_legacy(p, e, legacy_blobs),
        )
    keras_bytes = keras_path.read_bytes()
    (length,) = struct.unpack("<Q", keras_bytes[:8])
    for _ in range(30):
        add(
            "keras-reader",
            ".safetensors",
            "safetensors header",
            mt.header_edit(keras_bytes, rng),
        )
    for _ in range(10):
        add("keras-reader", ".safetensors", "truncation", mt.truncate(keras_bytes, rng))
    for _ in range(10):
        head = mt.flip(keras_bytes[: 8 + length], rng)
        add("keras-reader", ".safetensors", "byte flips", head + keras_bytes[8 + length :])
    compvis_path = folder / "compvis.safetensors"
    cases.append(("compvis", str(compvis_path), "baseline"))
    compvis = {k: v.read() for k, v in safetensors_io.read_safetensors(compvis_path)[0].items()}
    for _ in range(20):
        edited = mt.compvis_edit(compvis, rng)
        write = lambda p, e=edited: safetensors_io.write_safetensors(p, e)  # noqa: E731
        add("compvis", ".safetensors", "compvis keys", write=write)
    tensors, metadata = safetensors_io.read_safetensors(keras_path)
    for _ in range(24):
        edited = mt.config_edit(metadata, rng)
        write = lambda p, m=edited: safetensors_io.write_safetensors(p, tensors, metadata=m)  # noqa: E731
        add("full", ".safetensors", "config values", write=write)
    return cases


def _run(cases: list, case_file: Path, warmup: str) -> dict:
    """`{case index: (outcome, seconds)}`; a child that dies or hangs is replaced."""
    case_file.write_text(json.dumps(cases))
    results, start = {}, 0
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "TF_CPP_MIN_LOG_LEVEL": "3"}
    while start < len(cases):
        child = subprocess.Popen(
            [sys.executable, __file__, str(case_file), str(start), warmup],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            env=env,
        )
        index, wait = start, 180  # the first case waits for imports on a busy machine
        while index < len(cases):
            if not select.select([child.stdout], [], [], wait)[0]:
                child.kill()
                results[index] = ("hung", wait)
                break
            line = child.stdout.readline()
            if not line:
                results[index] = (f"died (exit {child.wait()})", 0)
                break
            done, outcome, seconds = json.loads(line)
            results[done] = (outcome, seconds)
            index, wait = done + 1, CASE_SECONDS + 15
        child.kill()
        child.wait()
        start = index + 1 if index < len(cases) else index
    return results


def test_fuzzed_checkpoints_load_or_are_refused(tmp_path):
    started = time.perf_counter()
    cases = _cases(tmp_path)
    results = _run(cases, tmp_path / "cases.json", cases[2][1])
    counts, bad = {}, []
    for index, (kind, path, family) in enumerate(cases):
        outcome, seconds = results.get(index, ("never run", 0))
        short = outcome.split(":")[0]
        counts.setdefault(family, {}).setdefault(short, 0)
        counts[family][short] += 1
        if outcome not in ("loaded", "refused") or seconds > CASE_SECONDS:
            bad.append(f"{Path(path).name} ({kind}): {outcome} in {seconds} s")
        if family == "baseline" and outcome != "loaded":
            bad.append(f"the unmodified {Path(path).name} did not load: {outcome}")
    print(
        f"\nfuzzed {len(cases)} checkpoint files (seed {SEED}) in "
        f"{time.perf_counter() - started:.1f} s:"
    )
    for family, outcomes in counts.items():
        print(f"  {family:20s} " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    assert len(cases) >= 500
    assert not bad, "\n".join(bad[:30])
    refused = sum(c.get("refused", 0) for c in counts.values())
    assert refused > len(cases) // 2  # the mutations do reach the checks


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
