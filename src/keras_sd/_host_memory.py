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


def request_pooled_host_memory() -> bool:
    """Set `TF_CPU_ALLOCATOR_USE_BFC=true` unless it is already set; True if pooling
    is what the variable now asks for.

    It takes effect only if TensorFlow has not made a tensor yet in this process;
    `keras_sd.backend.host_memory_pooled()` tells whether it did.

    Example:
    >>> request_pooled_host_memory() == (os.environ[POOL_VARIABLE].lower() in ("1", "true"))
    True
    """
    return os.environ.setdefault(POOL_VARIABLE, "true").strip().lower() in ("1", "true")


request_pooled_host_memory()
