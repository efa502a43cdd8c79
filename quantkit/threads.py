"""Intra-op thread control for loops of many small, memory-bound tensor operations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_cpu_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the body on one intra-op thread (CPU only); the setting is restored after.

    For work made of many small or memory-bound ops (GPTQ's column loop, repacking a
    checkpoint), a second OpenMP thread brings nothing, and on a busy CPU every parallel
    region waits for a descheduled thread: measured here 30x slower (GPTQ) and 4x slower
    (GPTQ -> AWQ conversion) with 2 threads under load.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
