"""How an eval or demo result reaches the user: tables that fit the terminal (Markdown when stdout is not
one), one line per failed row, and an exit code CI can trust."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from quantkit.cli.ui import UI, ProgressDisplay
from quantkit.errors import RowsFailedError


def show_result(ui: UI, result: dict[str, Any]) -> None:
    """Rich tables as wide as the terminal; the Markdown table when stdout is a pipe or a file (CI logs)."""
    from quantkit.eval.report import markdown, rich_report

    out = ui.out
    if out.is_terminal:
        out.print(rich_report(result, out.width), soft_wrap=False)
    else:
        out.print(markdown(result), markup=False, highlight=False, end="")


def row_line(row: dict[str, Any], base: dict[str, Any] | None, seconds: float) -> str:
    """The one line a checkpoint gets as soon as it is scored."""
    name = row.get("label") or row["model"]
    if row.get("error"):
        return f"✗ {name}: failed: {row['error']}"
    parts = [f"ppl {row['ppl']:.3f}"]
    if base is not None and not row.get("is_base") and base.get("ppl"):
        parts[0] += f" ({100 * (row['ppl'] / base['ppl'] - 1):+.1f}%)"
        parts += [f"KL {row['kl']:.4f}", f"top-1 {row['top1']:.2f}%"]
    if row.get("bits_per_weight"):
        parts.append(f"{row['bits_per_weight']:.2f} bits/w")
    if row.get("tps"):
        parts.append(f"{row['tps']:.1f} tok/s")
    return f"✓ {name}{' (base)' if row.get('is_base') else ''}: {', '.join(parts)}  [{seconds:.0f} s]"


def row_printer(display: ProgressDisplay | None) -> Callable[[dict[str, Any]], None] | None:
    """An `on_row` callback printing each row's line above the progress display (None when there is none)."""
    if display is None:
        return None
    state: dict[str, Any] = {"base": None, "t": time.perf_counter()}

    def on_row(row: dict[str, Any]) -> None:
        now = time.perf_counter()
        if row.get("is_base"):
            state["base"] = row
        display.line(row_line(row, state["base"], now - state["t"]))
        state["t"] = now

    return on_row


def report_failures(ui: UI, result: dict[str, Any], keep_going: bool, shown: bool = False) -> None:
    """One line on stderr per failed row (unless `shown` already, by `row_printer`), then exit 1 unless
    `keep_going`. Called after every row was printed."""
    rows = [r for r in result["rows"] if not r.get("is_base")]  # a failed base stops the run before this
    failed = [r for r in rows if r.get("error")]
    for r in failed if not shown else []:
        ui.err.print(f"failed: {r.get('label') or r['model']}: {r['error']}", markup=False, highlight=False)
    if failed and not keep_going:
        raise RowsFailedError(f"{len(failed)} of {len(rows)} checkpoints failed (--keep-going to exit 0 anyway)")
