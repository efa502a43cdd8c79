"""The built-in demo: smollm2-135m through every registered method, then one comparison table.

Entries are data. A checkpoint already present (with its quantkit.json) is reused
unless `force`, so a second run only re-evaluates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantkit.calib.pipeline import Progress
from quantkit.errors import QuantkitError
from quantkit.registry import method_names

log = logging.getLogger(__name__)

MODEL = "smollm2-135m"
CALIB = {"dataset": "wiki-vital", "nsamples": 64, "seqlen": 512, "seed": 0}

# name -> (method, scheme preset or None, calibration or None, method options)
ENTRIES: dict[str, tuple[str, str | None, dict | None, dict]] = {
    "rtn-w4g64": ("rtn", "w4g64", None, {}),
    "rtn-w3g64": ("rtn", "w3g64", None, {}),
    "gptq-w4g64": ("gptq", "w4g64", CALIB, {}),
    "gptq-w3g64": ("gptq", "w3g64", CALIB, {}),
    "awq-w4g64": ("awq", "w4g64", CALIB, {}),
    "nf4": ("nf4", None, None, {}),
    "int8": ("int8", None, None, {}),
}


def run_demo(out: Path, only: list[str] | None = None, max_windows: int = 40,
             device: torch.device | str = "cpu", force: bool = False, progress: Progress | None = None,
             log_line: Callable[[str], Any] | None = None, speed: bool = True) -> dict[str, Any]:
    """Quantize the entries (reusing finished ones), then one evaluation: quality on `max_windows`
    windows and, with `speed`, TTFT / decode / batched throughput on the fast kernels, relative to the base."""
    from quantkit.api import quantize
    from quantkit.eval.runner import evaluate_paths
    from quantkit.eval.speed import SpeedConfig

    available = set(method_names())
    names = [n for n in ENTRIES if ENTRIES[n][0] in available]
    if only:
        unknown = [n for n in only if n not in ENTRIES]
        if unknown:
            raise QuantkitError(f"unknown demo entry {unknown[0]!r}; choose from: {', '.join(ENTRIES)}")
        names = [n for n in names if n in only]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        method, preset, calib, options = ENTRIES[name]
        target = out / name
        if (target / "quantkit.json").is_file() and not force:
            if log_line:
                log_line(f"reusing {target}")
        else:
            s = quantize(MODEL, method, target, scheme=preset, calib=calib, options=options, device=device,
                         force=force or target.exists(), progress=progress)
            if log_line:
                log_line(f"{name}: quantized in {s['quantize_seconds']:.1f} s -> {target}")
        paths.append(str(target))
    return evaluate_paths(paths, base=MODEL, max_windows=max_windows, device=device, progress=progress,
                          speed=SpeedConfig() if speed else None, kernel="auto")
