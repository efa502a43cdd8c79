"""Evaluate checkpoints side by side against a base under the fixed protocol.

Rows are plain dicts (the JSON schema); a checkpoint that fails to load gets a
row with `error` set, and the other rows still complete.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from quantkit.calib.data import test_windows
from quantkit.calib.pipeline import Progress
from quantkit.errors import QuantkitError
from quantkit.eval.quality import evaluate
from quantkit.formats.loader import load
from quantkit.models.sources import load_tokenizer, resolve

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def describe(path: str) -> dict[str, Any]:
    """Method, format and size of a model path, from its files (no weights loaded)."""
    from quantkit.api import folder_size

    src = resolve(path)
    p = Path(src.path)
    row: dict[str, Any] = {"model": path, "method": "float", "format": src.kind, "size_bytes": folder_size(p)}
    if src.kind == "folder":
        prov = p / "quantkit.json"
        cfg = json.loads((p / "config.json").read_text())
        qc = cfg.get("quantization_config")
        if qc:
            row["format"] = qc.get("quant_method")
            row["method"] = qc.get("quant_method")
        if prov.is_file():
            meta = json.loads(prov.read_text())
            row["method"] = meta.get("method", row["method"])
            row["scheme"] = meta.get("scheme")
        try:
            from quantkit.formats.stats import checkpoint_stats

            row["bits_per_weight"] = checkpoint_stats(p).get("bits_per_weight")
        except (ImportError, QuantkitError, KeyError, ValueError) as e:
            log.debug("no stats for %s: %s", path, e)
    return row


def evaluate_paths(paths: list[str], base: str | None = None, dataset: str = "wiki-vital", seqlen: int = 512,
                   max_windows: int | None = 40, device: torch.device | str = "cpu", text_field: str = "text",
                   progress: Progress | None = None) -> dict[str, Any]:
    """Score `paths` (and `base`, marked) on the same windows; KL and top-1 against the base."""
    tok_src = resolve(base if base is not None else paths[0])
    windows = test_windows(load_tokenizer(tok_src), dataset, seqlen, max_windows, text_field)
    rows: list[dict[str, Any]] = []
    models = []
    names = ([base] if base is not None else []) + list(paths)
    for name in names:
        row = describe(name)
        row["is_base"] = name == base
        t0 = time.perf_counter()
        try:
            models.append(load(name, device=device, dtype=torch.float32))
            row["load_seconds"] = round(time.perf_counter() - t0, 3)
        except QuantkitError as e:
            if name == base:
                raise
            row["error"] = str(e)
            models.append(None)
        rows.append(row)
    base_model = models[0] if base is not None else None
    live = [(r, m) for r, m in zip(rows, models) if m is not None]
    scores = evaluate([m for _, m in live], windows, device, base=base_model, progress=progress)
    base_ppl = scores[0].ppl if base is not None else None
    for (row, _), q in zip(live, scores):
        row.update(ppl=q.ppl, nll=q.nll, tokens=q.tokens)
        if base is not None:
            row.update(kl=q.kl, kl_p99=q.kl_p99, top1=q.top1, delta_ppl_pct=100.0 * (q.ppl / base_ppl - 1.0))
    protocol = {"dataset": dataset, "seqlen": seqlen, "windows": int(windows.shape[0]),
                "predicted_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "device": str(device),
                "split": "last 200,000 characters", "dtype": "float32"}
    return {"schema_version": SCHEMA_VERSION, "protocol": protocol, "rows": rows}
