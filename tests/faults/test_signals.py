"""Signals: kill -9 at each step of a block's write (a test-only fault point, $QUANTKIT_TEST_FAULT, read by the
work folder's writer), then a resume that must give the uninterrupted run's exact bytes; and Ctrl-C (SIGINT),
which must say what was kept and how to continue, exit 130, and leave nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.calib.workdir import FAULT_ENV, FAULT_STEPS, work_path
from tests.faults.conftest import hashes, invoke, leftovers, quantize_args

ROOT = Path(__file__).resolve().parents[2]
KILLED_AT = 1  # the block whose write is cut


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "quantkit", *[str(a) for a in args]]


STEPS = [("gptq", s) for s in FAULT_STEPS if not s.startswith("side")] + [("awq", "side-written"),
                                                                          ("awq", "side-renamed")]


@pytest.mark.parametrize("method,step", STEPS, ids=[f"{m}-{s}" for m, s in STEPS])
def test_kill_9_at_each_step_of_a_block_write(method, step, tiny, reference, tmp_path):
    model, text = tiny
    out = tmp_path / "q"
    killed = subprocess.run(_cmd(*quantize_args(model, text, out, method)), env=_env(**{FAULT_ENV: f"{step}:{KILLED_AT}"}),
                            cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    done = json.loads((work_path(out) / "state.json").read_text())["done"]
    assert done == (KILLED_AT + 1 if FAULT_STEPS.index(step) >= FAULT_STEPS.index("state-renamed") else KILLED_AT)
    r = invoke(quantize_args(model, text, out, method))
    assert r.exit_code == 0, r.output
    assert hashes(out) == hashes(reference[method])  # byte-identical to the uninterrupted run
    assert not work_path(out).exists() and leftovers(tmp_path) == []


def test_ctrl_c_says_what_is_kept_and_the_same_command_continues(tiny, reference, tmp_path):
    model, text = tiny
    out = tmp_path / "q"
    args = quantize_args(model, text, out, "gptq")[1:]  # without -q: the interruption's line is still printed
    # Ctrl-C once block 1 is stored: sent by the process itself at that point (a signal timed from outside raced
    # the last blocks of this tiny model once GPTQ got faster)
    # SIGINT at its default in the child, as in a terminal: a test run started in the background (`cmd &` without job
    # control) ignores SIGINT, the child would inherit that, and Python installs no KeyboardInterrupt handler then
    proc = subprocess.Popen(_cmd(*args), env=_env(QUANTKIT_TEST_SIGINT_AFTER_BLOCK="1"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert (work_path(out) / "block-00001.safetensors").exists()  # the finished blocks are kept
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("interrupted: ") and "run the same command to continue" in lines[-1], err
    assert str(work_path(out)) in lines[-1] and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []  # nothing half-written where the checkpoint goes
    r = invoke(quantize_args(model, text, out, "gptq"))
    assert r.exit_code == 0, r.output
    assert hashes(out) == hashes(reference["gptq"]) and not work_path(out).exists()


def test_ctrl_c_before_any_block_says_nothing_was_written(tiny, tmp_path, monkeypatch):
    import quantkit.calib.pipeline as pipeline

    model, text = tiny

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "capture_inputs", interrupted)
    r = invoke(quantize_args(model, text, tmp_path / "q", "gptq"))
    assert r.exit_code == 130, r.output
    assert r.stderr.strip().splitlines() == [f"interrupted: nothing was written to {tmp_path / 'q'}; run the same "
                                             f"command to start again"]
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []
