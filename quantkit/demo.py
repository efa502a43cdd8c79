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
    "signround-w4g64": ("signround", "w4g64", CALIB, {}),  # AutoRound's algorithm, norms tuned too
    "nf4": ("nf4", None, None, {}),
    "rtn-w8": ("rtn", "w8", None, {}),  # quantkit's own 8-bit weights, served by the cpu-int8 kernel
    "int8": ("int8", None, None, {}),   # bitsandbytes LLM.int8 (8-bit weights and activations, fp16 outliers)
    "w8a8": ("smoothquant-rtn", "w8a8", CALIB, {}),  # int8 weights and per-token int8 activations (vLLM's INT8)
}


def run_demo(out: Path, only: list[str] | None = None, max_windows: int = 40,
             device: torch.device | str = "cpu", force: bool = False, progress: Progress | None = None,
             log_line: Callable[[str], Any] | None = None, speed: bool = True, model: str = MODEL,
             on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Quantize the entries of `model` (reusing finished ones), then one evaluation: quality on `max_windows`
    windows and, with `speed`, TTFT / decode / batched throughput on the fast kernels, relative to the base.
    `progress("models", k, n)` as entries are quantized; `log_line` says what each one took."""
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
    for k, name in enumerate(names):
        if progress:
            progress("models", k, len(names))
        method, preset, calib, options = ENTRIES[name]
        target = out / name
        if (target / "quantkit.json").is_file() and not force:
            if log_line:
                log_line(f"✓ {name}: reusing {target}")
        else:
            s = quantize(model, method, target, scheme=preset, calib=calib, options=options, device=device,
                         force=force or target.exists(), progress=progress)
            if log_line:
                log_line(f"✓ {name}: quantized in {s['quantize_seconds']:.1f} s -> {target}")
        paths.append(str(target))
    if progress:
        progress("models", len(names), len(names))
    return evaluate_paths(paths, base=model, max_windows=max_windows, device=device, progress=progress,
                          speed=SpeedConfig() if speed else None, kernel="auto", on_row=on_row)
