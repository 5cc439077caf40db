"""One textual-inversion training step on the full SD 1.5 configuration (random weights).

    flock /tmp/bigmem.lock python benchmarks/ti_step.py [float32|mixed_bfloat16] [STEPS]

Prints the first step (trace included), the mean of the later steps and the peak RSS.
"""

import json
import resource
import sys
import time

import keras
import numpy as np

from keras_sd import StableDiffusion
from keras_sd.training import TextualInversionTrainer

policy = sys.argv[1] if len(sys.argv) > 1 else "float32"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
keras.config.set_dtype_policy(policy)
start = time.perf_counter()
sd = StableDiffusion(512, 512, config="sd1", jit_compile=False)
trainer = TextualInversionTrainer(sd, "<cat-toy>", initializer_token="toy", seed=0)
trainer.compile(optimizer=keras.optimizers.AdamW(5e-4), jit_compile=False)
built = time.perf_counter() - start
rng = np.random.default_rng(0)
batch = {
    "images": rng.uniform(-1, 1, (1, 512, 512, 3)).astype("float32"),
    "token_ids": sd.tokenizer(["a photo of a <cat-toy>"]),
}
times = []
for _ in range(steps):
    tic = time.perf_counter()
    loss = trainer.train_on_batch(batch, return_dict=True)["loss"]
    times.append(time.perf_counter() - tic)
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
result = {
    "backend": keras.backend.backend(),
    "policy": policy,
    "build_s": round(built, 1),
    "first_step_s": round(times[0], 1),
    "later_steps_s": [round(t, 1) for t in times[1:]],
    "peak_rss_gb": round(peak_gb, 2),
    "loss": float(loss),
    "trainable": [v.path for v in trainer.trainable_variables],
}
print(json.dumps(result))
