"""The check's steps: each a named, timed record; the quantkit CLI runs as a subprocess, as a user runs it.

A step that fails records one line saying why; the run goes on with the steps that do not need it. A time
budget bounds the whole run: a subprocess is killed at the budget's end, and steps after it are not
started (each is recorded as failed, so the run exits non-zero).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("gpucheck.steps")


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str = ""
    log: str | None = None       # the subprocess's output file, for a CLI step


class Budget:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Steps:
    """Runs and records the steps; `failures` names every step that did not pass."""

    def __init__(self, budget: Budget, quantkit_cmd: list[str], env: dict[str, str], logdir: Path):
        self.budget, self.cmd, self.env, self.logdir = budget, quantkit_cmd, env, logdir
        self.records: list[Step] = []
        self.extra: list[str] = []  # failures found inside a passing step (a kernel off its tolerance)

    @property
    def failures(self) -> list[str]:
        return [f"{s.name}: {s.detail}" for s in self.records if not s.ok]

    def add(self, name: str, ok: bool, seconds: float, detail: str = "", logfile: Path | None = None) -> Step:
        step = Step(name, ok, round(seconds, 3), detail, str(logfile) if logfile else None)
        self.records.append(step)
        (log.info if ok else log.error)("%s %s (%.1f s)%s", "ok  " if ok else "FAIL", name, seconds,
                                        f": {detail}" if detail else "")
        return step

    def over_budget(self, name: str) -> bool:
        if self.budget.left() > 0:
            return False
        self.add(name, False, 0.0, "not started: the time budget is spent")
        return True

    def call(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run an in-process step; its exception (one line) fails the step. Returns fn's value or None."""
        if self.over_budget(name):
            return None
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.add(name, False, time.perf_counter() - t0, f"{type(e).__name__}: {first}")
            log.debug("traceback", exc_info=True)
            return None
        self.add(name, True, time.perf_counter() - t0)
        return value

    def cli(self, name: str, args: list[str], json_out: Path | None = None) -> dict | None:
        """`quantkit ARGS` as a subprocess (output to a log file); returns its --json summary, None on failure.

        Exit code 0 passes. eval's exit code 1 (a row failed) is a failure too, but its JSON is still returned."""
        if self.over_budget(name):
            return None
        logfile = self.logdir / (name.replace(" ", "_").replace("/", "-") + ".log")
        if json_out is not None:
            json_out.unlink(missing_ok=True)  # never read a summary a previous run left
        t0 = time.perf_counter()
        with open(logfile, "w") as fh:
            fh.write("$ " + " ".join(self.cmd + args) + "\n")
            fh.flush()
            try:
                rc = subprocess.run(self.cmd + args, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                    timeout=max(self.budget.left(), 1.0), check=False).returncode
            except subprocess.TimeoutExpired:
                self.add(name, False, time.perf_counter() - t0, "killed: the time budget ran out", logfile)
                return None
        seconds = time.perf_counter() - t0
        summary = None
        if json_out is not None and json_out.is_file():
            summary = json.loads(json_out.read_text())
        if rc != 0:
            self.add(name, False, seconds, f"exit code {rc}: {last_line(logfile)}", logfile)
        else:
            self.add(name, True, seconds, logfile=logfile)
        return summary

    def to_json(self) -> list[dict]:
        return [asdict(s) for s in self.records]


def last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def cli_env(work: Path) -> dict[str, str]:
    """The subprocesses' environment: offline, no progress bars, the packed-weight cache inside the work folder."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               QUANTKIT_PACK_CACHE_DIR=str(work / "pack-cache"), PYTHONUNBUFFERED="1")
    return env
