"""Device choice, per-device defaults, device names and timers (device-agnostic).

On CUDA, time is measured with CUDA events between synchronisations (kernels
run asynchronously, so host clocks would measure launch time); on CPU with
time.perf_counter.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.loading import resolve_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


select_device = resolve_device  # the one --device reader (quantkit.loading)


def default_seqlen(device: torch.device) -> int:
    """2048 on CUDA (the GPTQ/AWQ papers' protocol), 512 on CPU (affordable)."""
    return 2048 if device.type == "cuda" else 512


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (how the papers evaluate), float32 on CPU (fp16 matmuls are slow or missing there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise QuantkitError(f"unknown --dtype {name!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return f"{_cpu_model()} ({torch.get_num_threads()} threads of {os.cpu_count()} CPUs)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds between start() and stop(): CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._t0 = 0.0
        self._events: tuple | None = None

    def start(self) -> None:
        synchronize(self.device)
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda and self._events is not None:
            self._events[1].record()
            synchronize(self.device)
            return self._events[0].elapsed_time(self._events[1]) / 1000.0
        return time.perf_counter() - self._t0


def attn_implementation(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or getattr(cfg, "attn_implementation", None) or "eager")


def prefer_flash_attention(model: torch.nn.Module, device: torch.device) -> str:
    """Switch to flash_attention_2 on CUDA in fp16/bf16 when flash-attn is installed; returns what is used."""
    import importlib.util

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and importlib.util.find_spec("flash_attn"):
        try:
            model.set_attn_implementation("flash_attention_2")
        except (ValueError, ImportError, AttributeError):
            pass  # not supported by this architecture/build: keep sdpa
    return attn_implementation(model)
