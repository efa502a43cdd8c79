"""The check's result: one row per (model, method), the kernel walk, the steps; as Markdown and JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA = 1
COLUMNS = [  # (key, header, format)
    ("model", "model", "s"), ("method", "method", "s"), ("scheme", "scheme", "s"), ("quantize_s", "quantize s", ".1f"),
    ("quantize_peak_mib", "quantize peak MiB", ".0f"), ("eval_peak_mib", "eval peak MiB", ".0f"),
    ("ppl", "ppl", ".3f"), ("kl", "KL", ".4f"), ("ttft_ms", "TTFT ms", ".1f"), ("tps", "TPS", ".1f"),
    ("throughput_tps", "batch tok/s", ".1f"), ("kernels", "kernel", "s"),
    ("max_abs_dlogit", "max abs Δlogit", ".3g"), ("rel_dlogit", "rel Δlogit", ".2e"), ("status", "status", "s"),
]
KERNEL_COLUMNS = [
    ("kernel", "kernel", "s"), ("status", "status", "s"), ("served", "cases served", "d"),
    ("refused", "refused", "d"), ("worst_rel", "worst rel err", ".2e"), ("worst_ratio", "worst err/tol", ".2f"),
    ("max_abs", "max abs Δ", ".3g"), ("note", "note", "s"),
]


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def kernels_cell(kernels: dict[str, int] | None) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(kernels.items())) if kernels else "—"


def method_row(model: str, method: str, scheme: str, quant: dict | None, evalrow: dict | None,
               logits: dict | None, failed: list[str]) -> dict[str, Any]:
    """One row of the table from a quantize --json summary, an eval --json row and a logit check."""
    ev = evalrow or {}
    row = {"model": model, "method": method, "scheme": scheme,
           "quantize_s": quant.get("quantize_seconds") if quant else None,
           "quantize_peak_mib": mib(quant.get("peak_device_bytes")) if quant else None,
           "eval_peak_mib": mib(ev.get("peak_bytes")), "ppl": ev.get("ppl"), "kl": ev.get("kl"),
           "ttft_ms": ev.get("ttft_ms"), "tps": ev.get("tps"), "throughput_tps": ev.get("throughput_tps"),
           "kernels": (logits or {}).get("kernels") or ev.get("kernels"),
           "max_abs_dlogit": (logits or {}).get("max_abs_dlogit"), "rel_dlogit": (logits or {}).get("rel_dlogit"),
           "eval_error": ev.get("error")}
    row["status"] = "FAIL" if failed else "ok"
    row["failures"] = failed
    return row


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return kernels_cell(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, fmt) if fmt != "s" else str(value).replace("|", "/")


def md_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if f == "s" else "---:" for _, _, f in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    env, prof = result["environment"], result["profile"]
    mem = ("torch.cuda.max_memory_allocated while quantizing; eval: the largest CUDA allocation above the "
           "pre-load level" if result["device"].startswith("cuda") else
           "quantize: not measured on CPU; eval: peak RSS above the pre-load level")
    out = [
        f"# quantkit GPU check: {'PASS' if result['ok'] else 'FAIL'}",
        "",
        f"{env['device_name']} ({result['device']}), torch {env['torch']}, transformers {env['transformers']}, "
        f"quantkit {env['quantkit']}{', dry run (tiny models)' if result['dry_run'] else ''}; "
        f"wall {result['wall_seconds']:.0f} s of a {result['budget_seconds']:.0f} s budget.",
        "",
        md_table(result["rows"], COLUMNS),
        "",
        f"Models: {', '.join(result['models'])}. Random weights, so ppl is near the vocabulary size and only the "
        f"columns' presence and KL's smallness mean anything. Calibration {prof['nsamples']} × "
        f"{prof['seqlen']} tokens of the tree's Markdown; eval {prof['eval_windows']} windows of "
        f"{prof['eval_seqlen']} tokens in {result['eval_dtype']}, speed: prompt {prof['prompt_len']}, "
        f"{prof['gen_tokens']} new tokens, batch {prof['speed_batch']}, median of {prof['repeats']}. "
        f"Memory: {mem}. kernel: what kernel=\"auto\" served; Δlogit: its logits against the reference module's "
        f"on {prof['logit_tokens']} tokens (rel = ||Δ|| / ||ref||).",
        "",
        "## Kernels against the reference module",
        "",
        f"Every kernel of the registry that runs on {result['device']}; layer shapes "
        f"{', '.join(f'{o}x{i}' for o, i in result['kernel_shapes'])}; schemes {result['kernel_schemes']}; "
        f"GPTQ and AWQ layouts; activations {result['kernel_dtypes']}, 1 and 33 rows; tolerances of "
        "tests/unit/test_kernels.py.",
        "",
        md_table(result["kernels"], KERNEL_COLUMNS),
        "",
        "## Steps",
        "",
        md_table(result["steps"], [("name", "step", "s"), ("ok", "ok", "s"), ("seconds", "s", ".1f"),
                                   ("detail", "detail", "s")]),
    ]
    if result["failures"]:
        out += ["", "## Failures", ""] + [f"- {f}" for f in result["failures"]]
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(out: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "gpu-check.md", out / "gpu-check.json"
    write_atomic(js, json.dumps({"schema": SCHEMA, **result}, indent=2, default=str) + "\n")
    write_atomic(md, markdown(result))
    return md, js
