"""Peak memory of a region of code: CUDA allocator peaks on GPU, peak RSS on CPU.

On CUDA the figure is torch.cuda.max_memory_allocated over the region minus the
allocation at its start. On Linux the kernel keeps the exact peak RSS (VmHWM) and
lets a process reset it (writing 5 to /proc/self/clear_refs): the region starts
with a reset and ends with a read, so nothing runs beside the timed work. Where
that is not allowed, a background thread samples psutil RSS every `interval`
seconds instead. The figure is the peak minus the RSS at the start. Models are
evaluated one at a time and `release` runs between them (gc, CUDA cache, glibc
malloc_trim), so a row's figure is what that model adds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from types import TracebackType

import torch
from torch import nn


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible.

    The process-wide peak is lost: callers that want it must read it first."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return peak_rss_bytes() is not None
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """VmHWM (peak RSS since the start or the last reset), or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release(device: torch.device) -> None:
    """Give freed memory back: Python cycles, the CUDA caching allocator, glibc's heap."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage counted once: tied weights too)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_bytes` (increase over the start)."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device = device
        self.interval = interval
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self.start_bytes = 0
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel_peak = False

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_total = max(self.peak_total, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = rss_bytes()
            self.peak_total = self.start_bytes
            self._kernel_peak = reset_peak_rss()
            if not self._kernel_peak:
                self._thread = threading.Thread(target=self._sample, name="quantkit-rss", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_total = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = peak_rss_bytes() if self._kernel_peak else None
            self.peak_total = max(self.peak_total, rss_bytes(), peak or 0)

    @property
    def peak_bytes(self) -> int:
        return max(self.peak_total - self.start_bytes, 0)
