"""Comparison tables: rich for the terminal, Markdown for model cards and the README.

Columns follow the article's table: method, bits, size, memory, relative speed,
TTFT, TPS (and batched throughput), ppl, Δppl %, KL, top-1. Speed columns appear
only when speed was measured. The base row comes first and is marked; the other
rows are sorted by perplexity, failed rows last. The protocol is the caption.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table

MB = 1e6
COLUMNS = [  # (key, header, format, needs speed)
    ("label", "model", "{}", False),
    ("method", "method", "{}", False),
    ("bits_per_weight", "bits/w", "{:.2f}", False),
    ("bits_per_weight_all", "all bits/w", "{:.2f}", False),
    ("size_bytes", "size MB", "{:.1f}", False),
    ("peak_bytes", "mem MB", "{:.0f}", False),
    ("kv_bytes_per_token", "KV B/tok", "{:.0f}", False),
    ("context_bytes", "mem@ctx MB", "{:.1f}", False),
    ("rel_speed", "speed ×", "{:.2f}", True),
    ("ttft_ms", "TTFT ms", "{:.1f}", True),
    ("tps", "TPS", "{:.1f}", True),
    ("throughput_tps", "batch tok/s", "{:.1f}", True),
    ("ppl", "ppl", "{:.3f}", False),
    ("delta_ppl_pct", "Δppl %", "{:+.1f}", False),
    ("kl", "KL", "{:.4f}", False),
    ("top1", "top-1 %", "{:.2f}", False),
]
TEXT_KEYS = ("label", "method")


def quantized_cache(result: dict[str, Any]) -> bool:
    return any("KV fp8" in str(r.get("format")) for r in result["rows"])


def columns(result: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The columns the result has figures for: speed ones when speed was measured; KV bytes per token and mem@ctx
    with a --context, KV bytes per token also when a row's cache is quantized (the JSON always has them)."""
    speed = result["protocol"].get("speed") is not None
    context = result["protocol"].get("context")
    kv = bool(context) or quantized_cache(result)
    return [c for c in COLUMNS if (speed or not c[3]) and (context or c[0] != "context_bytes")
            and (kv or c[0] != "kv_bytes_per_token")]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if key == "label" and v is None:
        v = row.get("model")
    if v is None:
        return "-"
    if key in ("size_bytes", "peak_bytes", "context_bytes"):
        v = v / MB
    return fmt.format(v)


def caption(result: dict[str, Any]) -> str:
    p = result["protocol"]
    windows = (f"{p['windows']} windows of {p['seqlen']} tokens every {p['stride']} (sliding; each token scored once)"
               if p.get("overlapping") else f"{p['windows']} non-overlapping windows of {p['seqlen']} tokens")
    text = (f"{p['dataset']} ({p.get('split_text', p.get('split'))}), {windows}, {p['predicted_tokens']} predicted "
            f"tokens; {p['dtype']} on {p.get('device_name') or p['device']}. ppl = exp(mean NLL); KL(base‖model) "
            f"over the full vocabulary and top-1 agreement on the same tokens, scored on the checkpoint's exact "
            f"maths. mem = peak {'CUDA allocation' if str(p['device']).startswith('cuda') else 'RSS'} above the "
            f"pre-load level over load and {'generation' if p.get('speed') else 'one window'} on the served kernels.")
    if p.get("context") or quantized_cache(result):
        text += (" KV B/tok = KV-cache bytes per token, layers × KV heads × head dim × 2 × (1 byte for an FP8 cache, "
                 "else 2); a KV-fp8 row is scored with its keys and values fake-quantized to FP8 with its scales.")
    if p.get("context"):
        text += f" mem@ctx = stored weights + KV cache at {p['context']} tokens (batch 1)."
    s = p.get("speed")
    if s:
        text += (f" Speed: greedy, KV cache, prompt {s['prompt_len']} tokens, {s['gen_tokens']} new tokens, "
                 f"median of {s['repeats']} runs after warm-up ({s['timer']}); TTFT and TPS at batch 1, "
                 f"batch tok/s at batch {s['batch']}; speed × = TPS / base TPS.")
    return text


def sorted_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(result["rows"], key=lambda r: (not r.get("is_base"), r.get("error") is not None,
                                                 r.get("ppl") if r.get("ppl") is not None else float("inf")))


def _cells(row: dict[str, Any], cols: list[tuple[str, str, str, bool]]) -> list[str]:
    return [_cell(row, k, f) for k, _, f, _ in cols]


QUALITY_KEYS = ("ppl", "delta_ppl_pct", "kl", "top1")


def _table(result: dict[str, Any], cols: list[tuple[str, str, str, bool]], title: str, tight: bool) -> Table:
    """One rich table of `cols`. `tight`: numeric columns exactly as wide as their longest number or header
    word (headers wrap, numbers never do) and the text columns fold, so the table fits a narrow terminal."""
    rows = sorted_rows(result)
    table = Table(title=title, title_justify="left")
    first_number = next(i for i, c in enumerate(cols) if c[0] not in TEXT_KEYS)
    for i, (key, header, fmt, _) in enumerate(cols):
        if key in TEXT_KEYS:
            table.add_column(header, justify="left", overflow="fold")
            continue
        cells = [_cell(r, key, fmt) for r in rows if not r.get("error")] + (["failed"] if i == first_number else [])
        width = max([len(c) for c in cells] + [max(len(w) for w in header.split())]) if tight else None
        table.add_column(header, justify="right", no_wrap=not tight, overflow="fold", width=width, min_width=width)
    for row in rows:
        cells = _cells(row, cols)
        if row.get("error"):
            cells = [c if k in TEXT_KEYS else "-" for c, (k, _, _, _) in zip(cells, cols)]
            cells[first_number] = "[red]failed"
        elif row.get("is_base"):
            cells[0] = f"[bold]{cells[0]} (base)"
        table.add_row(*cells)
    return table


def _width(table: Table) -> int:
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(width=100_000)
    return Measurement.get(console, console.options, table).maximum


def rich_tables(result: dict[str, Any], width: int) -> list[Table]:
    """The comparison as rich tables that fit `width` columns: one table when it fits, otherwise two stacked
    ones (quality: ppl, Δppl, KL, top-1; cost: bits/w, size, memory and speed), their headers wrapped if
    need be. Numbers are never cut: only the model and method names fold."""
    cols = columns(result)
    whole = _table(result, cols, "quantkit eval", tight=False)
    if _width(whole) <= width:
        return [whole]
    parts = (("quality", [c for c in cols if c[0] in TEXT_KEYS or c[0] in QUALITY_KEYS]),  # model, method, ...
             ("cost", [cols[0]] + [c for c in cols if c[0] not in TEXT_KEYS and c[0] not in QUALITY_KEYS]))
    tables = []
    for title, part in parts:
        table = _table(result, part, f"quantkit eval: {title}", tight=False)
        tables.append(table if _width(table) <= width else _table(result, part, f"quantkit eval: {title}", tight=True))
    return tables


def rich_report(result: dict[str, Any], width: int) -> Group:
    """The tables for a terminal `width` columns wide, then the protocol as a wrapped paragraph."""
    from rich.text import Text

    return Group(*rich_tables(result, width), Text(caption(result), style="dim"))


def markdown(result: dict[str, Any]) -> str:
    cols = columns(result)
    lines = ["| " + " | ".join(h for _, h, _, _ in cols) + " |",
             "|" + "|".join("---" if k in TEXT_KEYS else "---:" for k, _, _, _ in cols) + "|"]
    for row in sorted_rows(result):
        cells = _cells(row, cols)
        if row.get("error"):
            lines.append(f"| {cells[0]} | {cells[1]} | failed: {row['error'].replace('|', '/')} |")
            continue
        if row.get("is_base"):
            cells[0] += " (base)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{caption(result)}\n"
