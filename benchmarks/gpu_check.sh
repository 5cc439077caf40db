#!/bin/bash
# GPU check in one call, for a GPU machine without TensorFlow: keras-sd on JAX, diffusers
# eager (SDPA) and KerasCV on Keras 3's JAX backend (`keras-cv-jax`; XLA, mixed_float16)
# at the GPU settings, batch 1, then diffusers with torch.compile merged into the same
# table (one compilation of a minute or more, so it gets most of what is left), then
# a profile of keras-sd's load, then the float16 precision tests on the GPU while time
# remains. Wheels in .whl/ (keras, diffusers, ftfy, ...) are installed to /tmp/site
# first when present. Results land in $OUT (default /tmp/out).
#     bash benchmarks/gpu_check.sh
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
TOTAL=${TOTAL_LIMIT:-575}
[ -n "$NO_WHEELS" ] || [ ! -d .whl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=${SITE:-/tmp/site}:$PWD/src KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; nproc; python3 -c "
import jax, keras, torch, diffusers, transformers, numpy
print('jax', jax.__version__, jax.devices()); print('keras', keras.__version__, keras.backend.backend())
print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0)); print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)
import keras_sd; print('keras_sd ok, accelerator:', keras_sd.backend.has_accelerator())
"; } 2>&1 | tee $OUT/env.txt
BENCH="python3 benchmarks/bench.py --repeats 5 --t2i-repeats 2 --weights-dir /tmp/w"
B="$BENCH ${BENCH_ARGS:---gpu --batch 1}"
echo "== bench A at $(el) s"
timeout ${LIMIT_A:-360} $B --runtimes keras-sd-jax diffusers keras-cv-jax --skip compile --timeout 200 --out-dir /tmp/benchA 2>&1 | tee $OUT/benchA.txt
echo "== bench A end at $(el) s"
(cd /tmp/benchA && tar czf $OUT/benchA-files.tgz --exclude='keras-cv-weights-*' . ) 2>/dev/null
LEFT=$(( TOTAL - $(el) ))
echo "== bench B (torch.compile, batch 1) at $(el) s, ${LEFT} s left"
MERGE=""; [ -f /tmp/benchA/results.json ] && MERGE="--merge /tmp/benchA/results.json"
B1="$BENCH ${BENCH_B_ARGS:---gpu --batch 1}"
if [ $LEFT -gt 60 ]; then
  TB=$(( LEFT - ${TESTS_RESERVE:-70} )); [ $TB -ge 60 ] || TB=$(( LEFT - 15 ))
  timeout $TB $B1 --runtimes diffusers --only compile --timeout $((TB - 10)) --out-dir /tmp/benchB $MERGE 2>&1 | tee $OUT/benchB.txt
fi
(cd /tmp/benchB && tar czf $OUT/benchB-files.tgz --exclude='keras-cv-weights-*' . ) 2>/dev/null
LEFT=$(( TOTAL - $(el) ))
echo "== load profile at $(el) s, ${LEFT} s left"
[ $LEFT -gt 90 ] && timeout 60 python3 benchmarks/profile_load.py --path /tmp/w --top 30 2>&1 | grep -v "^[WIE]0" | tee $OUT/load_profile.txt | head -20
LEFT=$(( TOTAL - $(el) ))
echo "== tests at $(el) s, ${LEFT} s left"
# progress bars end in carriage returns: split on them before filtering them out;
# -o addopts= drops pyproject's `-n 2` (pytest-xdist is not among the wheels)
[ $LEFT -gt 30 ] && timeout $((LEFT - 10)) python3 -m pytest -q -o addopts= -p no:cacheprovider --no-header -rfE --tb=short -k "mixed_float16 or float16_policy" \
  tests/models/test_unet.py tests/models/test_vae.py tests/models/test_clip_text.py tests/test_pipeline.py 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]" | tail -60 | tee $OUT/tests.txt
echo "== done at $(el) s"
