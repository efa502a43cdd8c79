"""Comparison tables: rich for the terminal, Markdown for model cards and the README.

Columns follow the article's table: method, bits, size, memory, relative speed,
TTFT, TPS (and batched throughput), ppl, Δppl %, KL, top-1. Speed columns appear
only when speed was measured. The base row comes first and is marked; the other
rows are sorted by perplexity, failed rows last. The protocol is the caption.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

MB = 1e6
COLUMNS = [  # (key, header, format, needs speed)
    ("label", "model", "{}", False),
    ("method", "method", "{}", False),
    ("bits_per_weight", "bits/w", "{:.2f}", False),
    ("size_bytes", "size MB", "{:.1f}", False),
    ("peak_bytes", "mem MB", "{:.0f}", False),
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


def columns(result: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    speed = result["protocol"].get("speed") is not None
    return [c for c in COLUMNS if speed or not c[3]]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if key == "label" and v is None:
        v = row.get("model")
    if v is None:
        return "-"
    if key in ("size_bytes", "peak_bytes"):
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


def rich_table(result: dict[str, Any]) -> Table:
    cols = columns(result)
    table = Table(title="quantkit eval", caption=caption(result), caption_justify="left")
    for key, header, _, _ in cols:
        table.add_column(header, justify="left" if key in TEXT_KEYS else "right")
    for row in sorted_rows(result):
        cells = _cells(row, cols)
        if row.get("error"):
            table.add_row(cells[0], cells[1], *["-"] * (len(cols) - 3), f"[red]{row['error']}")
            continue
        if row.get("is_base"):
            cells[0] = f"[bold]{cells[0]} (base)"
        table.add_row(*cells)
    return table


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
