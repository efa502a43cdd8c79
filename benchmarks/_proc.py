"""This process's cost, for the benchmark children: peak RSS and CPU seconds."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_mib() -> float:
    """Peak RSS in MiB: VmHWM on Linux (ru_maxrss would inherit the parent's peak through exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """User + system CPU seconds of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
