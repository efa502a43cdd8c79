"""Compute settings: intra-op threads for memory-bound loops, whether a device has fast bf16, and whether
torch.compile can build kernels for it."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls on `device` run at least as fast as fp32: CUDA with bf16, or a CPU with AMX tiles.

    AVX512-BF16 alone is not enough. Measured on a Xeon with AVX512-BF16 and no AMX (torch 2.13, one thread):
    a (4096 x 576) @ (576 x 1536) matmul ran at 152 GFLOP/s in fp32 and 94 in bf16; causal SDPA forward +
    backward (8 x 9 heads x 512 x 64) took 0.14 s in fp32 and 0.29 s in bf16; a Linear's forward + backward
    under bf16 autocast 1.7x its fp32 time. On a plain AVX2 CPU bf16 is emulated (5x slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_calib_dtype(option: str, device: torch.device | str) -> str:
    """A method's calib_dtype option with "auto" resolved for `device`: bfloat16 where it is fast, else float32."""
    if option == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    return option


def can_compile(device: torch.device | str) -> bool:
    """Whether torch.compile can build kernels for `device`: CUDA with Triton, or a CPU with a C++ compiler."""
    device = torch.device(device)
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device.type != "cpu":
        return False
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`obj` with `fn` applied to every tensor in it, through nested tuples, lists and dicts (a module's inputs)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in `obj`, through nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o)
