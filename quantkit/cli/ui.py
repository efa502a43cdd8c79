"""Console, logging and progress for the CLI (the only place besides reports that imports rich)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


OUTER_STAGES = ("checkpoints", "models")  # progress stages drawn as the overall bar; every other one is the current step


class LibraryWarnings(logging.Filter):
    """At default verbosity, third-party warnings (log records from other packages and Python warnings) are
    counted here instead of shown; `summary` gives one line per package. quantkit's own records and every
    error pass. `show`: let the warnings through as well (--verbose, --debug)."""

    def __init__(self, show: bool) -> None:
        super().__init__()
        self.show = show
        self.counts: Counter[tuple[str, str]] = Counter()

    @staticmethod
    def package(record: logging.LogRecord) -> str:
        if record.name == "py.warnings":  # logging.captureWarnings: the message starts with the file's path
            match = re.search(r"site-packages[/\\]([A-Za-z0-9_]+)", record.getMessage())
            return match.group(1) if match else "python"
        return record.name.split(".")[0]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] == "quantkit" or record.levelno >= logging.ERROR or self.show:
            return True
        message = record.getMessage()
        if record.name == "py.warnings":
            message = next((ln.strip() for ln in message.splitlines() if "Warning: " in ln), message.splitlines()[0])
            message = message.split("Warning: ", 1)[-1]
        self.counts[(self.package(record), message.splitlines()[0] if message else "")] += 1
        return False

    def summary(self) -> list[str]:
        """One line per package: how many warnings were hidden, and the most frequent one."""
        by_package: dict[str, list[tuple[int, str]]] = {}
        for (package, message), n in self.counts.items():
            by_package.setdefault(package, []).append((n, message))
        lines = []
        for package, items in sorted(by_package.items()):
            total = sum(n for n, _ in items)
            n, message = max(items)
            text = message if len(message) <= 90 else message[:89] + "…"
            lines.append(f"{package}: {total:,} warning{'s' if total > 1 else ''} hidden, "
                         f"{'' if n == total else f'{n:,} of them '}\"{text}\" (shown with --verbose)")
        return lines


@dataclass
class UI:
    quiet: bool = False
    debug: bool = False
    verbose: bool = False
    warnings: LibraryWarnings | None = None

    @property
    def out(self) -> Console:
        return Console(quiet=self.quiet, soft_wrap=True)

    @property
    def err(self) -> Console:
        return Console(stderr=True, soft_wrap=True)

    def close(self, summarise: bool = True) -> None:
        """After the command: the hidden library warnings, one line per package (not after an error, which
        stays the one line a failed command prints)."""
        if self.warnings is not None:
            for line in self.warnings.summary() if summarise else []:
                self.err.print(line, markup=False, highlight=False, style="dim")
            self.warnings.counts.clear()


def setup_logging(quiet: bool, debug: bool, verbose: bool = False) -> LibraryWarnings:
    """Errors only with `quiet`; quantkit's warnings, a progress display and results by default (library
    warnings counted, see LibraryWarnings); quantkit's INFO lines and library warnings with `verbose`;
    everything with `debug`."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # library tqdm bars (GGUF dequantization) would fight rich's
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    counter = LibraryWarnings(show=debug or verbose)
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=debug)
    handler.addFilter(counter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings from libraries go through the same count
    ours = logging.DEBUG if debug else (logging.ERROR if quiet else (logging.INFO if verbose else logging.WARNING))
    logging.getLogger("quantkit").setLevel(ours)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return counter


def command_quiet(ui: UI, quiet: bool) -> bool:
    """A subcommand's --quiet or the global one; either leaves errors only (quantkit's INFO lines too)."""
    quiet = quiet or ui.quiet
    if quiet and not ui.debug:
        logging.getLogger("quantkit").setLevel(logging.ERROR)
    return quiet


class ProgressDisplay:
    """The one live display of a command: an overall bar (the OUTER_STAGES: checkpoint i of n) and a bar for
    the current step (blocks, windows, tensors), each redrawn in place; `line` prints a line that stays.
    Without a terminal (a pipe, a CI log) there are no bars, only the lines."""

    def __init__(self, bar: Progress | None, console: Console) -> None:
        self.bar, self.console = bar, console
        self.outer: Any = None
        self.inner: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        outer = stage in OUTER_STAGES
        task = self.outer if outer else self.inner
        if task is None:
            task = self.bar.add_task(stage, total=total)
            if outer:
                self.outer = task
            else:
                self.inner = task
        self.bar.update(task, description=stage, completed=done, total=total)

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(enabled: bool, title: str) -> Iterator[ProgressDisplay | None]:
    """Yield a ProgressDisplay, a callback `(stage, done, total)` (None when disabled)."""
    if not enabled:
        yield None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        yield ProgressDisplay(None, console)
        return
    with Progress(TextColumn(f"[bold]{title}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        yield ProgressDisplay(bar, console)


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
