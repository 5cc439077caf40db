"""Where the time of one checkpoint load goes (issue 6 point 5, issue 4 point 6).

    python benchmarks/profile_load.py --path /tmp/keras-sd-bench/sd15-seed0
    KERAS_BACKEND=jax python benchmarks/profile_load.py --path model.safetensors

Loads `--path` (any layout `StableDiffusion.from_checkpoint` reads) once
in this process, after one untimed read of its files so that they are in the page
cache, and prints:
  - the total seconds, and the main thread's profile (cProfile, `--top` functions by
    cumulative time): model build, waits for the conversion workers, variable creation;
  - seconds spent inside the conversion steps, summed per thread (reads from the file,
    host-to-backend copies, backend transposes, numpy transposes);
  - on JAX, how many XLA programs were compiled during the load (each new shape of an
    eager op is one).
Measured, never estimated; nothing here gates CI.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import logging
import os
import pstats
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

SPENT = collections.defaultdict(float)  # (step, thread name prefix) -> seconds
_LOCK = threading.Lock()


def timed(step: str, fn):
    """`fn`, adding its seconds to SPENT[step, calling thread's name prefix]."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            thread = threading.current_thread().name.rsplit("_", 1)[0]
            with _LOCK:
                SPENT[step, thread] += time.perf_counter() - start

    return wrapper


def warm_page_cache(path: str) -> None:
    files = [path]
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for name in files:
        with open(name, "rb") as f:
            while f.read(1 << 24):
                pass


class CompileCounter(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "Compiling" in record.getMessage():
            self.count += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", required=True, help="checkpoint file or folder")
    parser.add_argument("--top", type=int, default=25, help="functions shown")
    parser.add_argument(
        "--copy",
        action="store_true",
        help="take the path where variables copy their values (GPUs, PyTorch) on a CPU too: "
        "one conversion worker with the backend's kernels instead of the arena",
    )
    args = parser.parse_args()
    warm_page_cache(args.path)

    import keras

    from keras_sd import backend
    from keras_sd.weights import checkpoint, prefetch, safetensors_io, transpose

    backend.use_pooled_host_memory()  # as the keras-sd command does

    keras.ops.transpose = timed("backend transpose", keras.ops.transpose)
    keras.ops.convert_to_tensor = timed("to backend tensor", keras.ops.convert_to_tensor)
    safetensors_io.LazyTensor.read = timed("file read", safetensors_io.LazyTensor.read)
    prefetch.transpose_into = timed("numpy transpose", prefetch.transpose_into)
    transpose.transpose_into = timed("numpy transpose", transpose.transpose_into)
    if args.copy:
        prefetch._adopts_host_memory = lambda dtype: False
    counter = None
    if keras.backend.backend() == "jax":
        import jax

        counter = CompileCounter()
        logging.getLogger("jax").addHandler(counter)
        jax.config.update("jax_log_compiles", True)
        logging.getLogger("jax").setLevel(logging.WARNING)

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    checkpoint.checkpoint_kwargs(args.path)
    profile.disable()
    total = time.perf_counter() - start

    how = " (copying path)" if args.copy else ""
    print(f"load of {args.path} on {keras.backend.backend()}{how}: {total:.2f} s")
    if counter is not None:
        print(f"XLA programs compiled during the load: {counter.count}")
    print("\nseconds inside conversion steps, per thread:")
    for (step, thread), seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {step:<20} {thread:<28} {seconds:7.2f}")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
    print("\nmain thread, by cumulative time:")
    print(out.getvalue())


if __name__ == "__main__":
    main()
