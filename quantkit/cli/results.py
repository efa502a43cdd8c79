"""How an eval or demo result reaches the user: tables that fit the terminal (Markdown when stdout is not
one), one line per failed row, and an exit code CI can trust."""

from __future__ import annotations

from typing import Any

from quantkit.cli.ui import UI
from quantkit.errors import RowsFailedError


def show_result(ui: UI, result: dict[str, Any]) -> None:
    """Rich tables as wide as the terminal; the Markdown table when stdout is a pipe or a file (CI logs)."""
    from quantkit.eval.report import markdown, rich_report

    out = ui.out
    if out.is_terminal:
        out.print(rich_report(result, out.width))
    else:
        out.print(markdown(result), markup=False, highlight=False, end="")


def report_failures(ui: UI, result: dict[str, Any], keep_going: bool) -> None:
    """One line on stderr per failed row, then exit 1 unless `keep_going` (the rows are all printed first)."""
    rows = [r for r in result["rows"] if not r.get("is_base")]  # a failed base stops the run before this
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        ui.err.print(f"failed: {r.get('label') or r['model']}: {r['error']}", markup=False, highlight=False)
    if failed and not keep_going:
        raise RowsFailedError(f"{len(failed)} of {len(rows)} checkpoints failed (--keep-going to exit 0 anyway)")
