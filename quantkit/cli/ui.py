"""Console, logging and progress for the CLI (the only place besides reports that imports rich)."""

from __future__ import annotations

import json
import os
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass
class UI:
    quiet: bool = False
    debug: bool = False

    @property
    def out(self) -> Console:
        return Console(quiet=self.quiet, soft_wrap=True)

    @property
    def err(self) -> Console:
        return Console(stderr=True, soft_wrap=True)


def setup_logging(quiet: bool, debug: bool) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # library tqdm bars (GGUF dequantization) would fight rich's
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [RichHandler(console=Console(stderr=True), show_time=False, show_path=debug)]
    root.setLevel(level)
    logging.getLogger("quantkit").setLevel(logging.DEBUG if debug else (logging.ERROR if quiet else logging.INFO))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def command_quiet(ui: UI, quiet: bool) -> bool:
    """A subcommand's --quiet or the global one; either leaves errors only (quantkit's INFO lines too)."""
    quiet = quiet or ui.quiet
    if quiet and not ui.debug:
        logging.getLogger("quantkit").setLevel(logging.ERROR)
    return quiet


@contextmanager
def progress_bar(enabled: bool, title: str) -> Iterator[Any]:
    """Yield a callback `(stage, done, total)` drawing one rich bar per stage (a no-op when disabled)."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn(f"[bold]{title}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def emit_table(ui: "UI", data: Any, json_out: str | None, title: str, rows: Iterable[Any],
               columns: dict[str, Callable[[Any], str]]) -> None:
    """`data` as JSON where --json asks, then (unless the JSON went to stdout) a table of `rows`, one
    column per `columns` entry: its header and how a row renders in it."""
    from rich.table import Table

    emit_json(data, json_out)
    if json_out == "-":
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*(cell(r) for cell in columns.values()))
    ui.out.print(table)


def emit_json(data: Any, dest: str | None) -> None:
    """Write `data` as JSON to a file, or to stdout for "-"."""
    if dest is None:
        return
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(dest).write_text(text + "\n")
