"""Pooled host memory for TensorFlow, requested before TensorFlow allocates anything.

TensorFlow's default CPU allocator hands each large buffer back to the operating
system when it is freed, so every UNet call maps its activations (1 GB of
attention scores per 64x64 self-attention at 512 px, batch 2) as new memory and
pays a page fault per 4 KB page: about 0.5 million faults per such attention
layer, which took longer than its arithmetic on the 2-core CPUs measured in
benchmarks/RESULTS.md. TensorFlow's best-fit pooling allocator
(`TF_CPU_ALLOCATOR_USE_BFC`) keeps freed memory for the next buffer instead.

TensorFlow reads the variable once, when it makes its first tensor, so
`keras_sd/__init__.py` imports this module before anything else. A value set by
the user (for example `TF_CPU_ALLOCATOR_USE_BFC=false`) is kept. The other
backends ignore the variable.
"""

from __future__ import annotations

import os

POOL_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"

# Whether it took effect: `keras_sd.backend.host_memory_pooled()`.
os.environ.setdefault(POOL_VARIABLE, "true")
