"""The C heap during calibration: hand freed pages back after each block, and keep large buffers in their own
mappings so the peak does not climb with the heap's holes (glibc; no-ops elsewhere)."""

from __future__ import annotations

import ctypes
import gc
import os


def release_heap() -> None:
    """Return freed C-heap pages to the OS (glibc's malloc_trim); a no-op elsewhere.

    Called after every block: with several threads, glibc keeps each block's freed buffers in
    per-thread arenas and RSS would creep up with depth (measured: +2 MB per block at 2 threads).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD = 4 * 2**20  # bytes: allocations this large get their own mapping (glibc M_MMAP_THRESHOLD)


def steady_heap() -> None:
    """Serve every allocation of MMAP_THRESHOLD bytes or more (weights, activations, Hessians, GPTQ and AWQ
    work tensors) from its own mmap, unmapped when freed; a no-op off glibc or when MALLOC_MMAP_THRESHOLD_
    is set (the user's choice).

    glibc's default threshold is dynamic: each freed mmapped chunk raises it, up to 32 MiB, after which
    every tensor below 32 MiB (a 2048-wide batch of activations, a 2048 x 2048 Hessian) comes from the
    heap, where freed ones stay resident until `release_heap` and the holes between live ones vary from
    block to block. Measured (random Llama, hidden 2048, intermediate 5504, GPTQ --offload disk, 16 x 512,
    1 thread): traced, block peaks 3064, 3114, 3149, 3121, 3134, 3137, 3189, 3152 MiB over 8 blocks with a
    649-831 MiB main arena, against 3001-3007 MiB and a 133-151 MiB arena with this; untraced A/B on 3
    blocks, 3109 / 3115 MiB without, 3053 / 3082 MiB with, in the same time (110-115 s).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD (also stops its adjustment)
    except (OSError, AttributeError):
        pass
