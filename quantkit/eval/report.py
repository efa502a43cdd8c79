"""Comparison tables: rich for the terminal, Markdown for model cards and the README."""

from __future__ import annotations

from typing import Any

from rich.table import Table

COLUMNS = [  # (key, header, format)
    ("model", "model", "{}"),
    ("method", "method", "{}"),
    ("bits_per_weight", "bits/w", "{:.2f}"),
    ("size_bytes", "size MB", "{:.1f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("delta_ppl_pct", "Δppl %", "{:+.1f}"),
    ("kl", "KL", "{:.4f}"),
    ("top1", "top-1 %", "{:.2f}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "size_bytes":
        v = v / 1e6
    return fmt.format(v)


def caption(result: dict[str, Any]) -> str:
    p = result["protocol"]
    return (f"{p['dataset']} test split ({p['split']}), {p['windows']} non-overlapping windows of {p['seqlen']} tokens "
            f"({p['predicted_tokens']} predicted tokens), {p['dtype']} on {p['device']}; KL(base‖model) and top-1 vs the base")


def sorted_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(result["rows"], key=lambda r: (not r.get("is_base"), r.get("error") is not None, r.get("ppl") or 0))


def rich_table(result: dict[str, Any]) -> Table:
    table = Table(title="quantkit eval", caption=caption(result))
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="left" if header in ("model", "method") else "right")
    for row in sorted_rows(result):
        if row.get("error"):
            table.add_row(row["model"], row.get("method", "-"), *["-"] * (len(COLUMNS) - 3), f"[red]{row['error']}")
            continue
        cells = [_cell(row, k, f) for k, _, f in COLUMNS]
        if row.get("is_base"):
            cells[0] = f"[bold]{cells[0]} (base)"
        table.add_row(*cells)
    return table


def markdown(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("model", "method") else "---:" for k, _, _ in COLUMNS) + "|"]
    for row in sorted_rows(result):
        if row.get("error"):
            lines.append(f"| {row['model']} | {row.get('method', '-')} | failed: {row['error']} |")
            continue
        cells = [_cell(row, k, f) for k, _, f in COLUMNS]
        if row.get("is_base"):
            cells[0] += " (base)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{caption(result)}\n"
