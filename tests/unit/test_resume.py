"""Per-block resume: a run SIGKILLed anywhere continues from its last finished block, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.api import quantize
from quantkit.calib.workdir import ResumeError, WorkFolder, work_path
from quantkit.cli.main import app
from tests.tiny import llama_config, make_model, write_text

ROOT = Path(__file__).resolve().parents[2]
CALIB = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    return make_model(base / "m", llama_config(layers=4)), write_text(base / "calib.txt")


def _args(model, text, out, method, *extra):
    return ["-q", "quantize", str(model), "-o", str(out), "-m", method, "--bits", "4", "--group-size", "32",
            "--dataset", str(text), "--device", "cpu", *CALIB, *extra]


def _cmd(*args):
    return [sys.executable, "-m", "quantkit", *_args(*args)]


def _cli(*args):
    """The same command in this process (no interpreter start-up): the uninterrupted reference runs."""
    r = CliRunner().invoke(app, _args(*args))
    assert r.exit_code == 0, r.output


def _run(cmd, **env):
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT, capture_output=True,
                          text=True)


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("method,extra", [("gptq", ()), ("awq", ("--offload", "disk"))])
def test_sigkill_in_block_then_resume_is_byte_identical(model, tmp_path, method, extra):
    folder, text = model
    _cli(folder, text, tmp_path / "full", method)
    out = tmp_path / "killed"
    killed = _run(_cmd(folder, text, out, method, *extra), QUANTKIT_TEST_KILL_AT_BLOCK="2")
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    state = json.loads((work_path(out) / "state.json").read_text())
    assert state["done"] == 2  # blocks 0 and 1 finished; block 2 was lost mid-way
    resumed = _run(_cmd(folder, text, out, method))  # in memory now: the offload mode may change on resume
    assert resumed.returncode == 0, resumed.stderr
    assert not work_path(out).exists()  # removed after a successful save
    assert _hashes(out) == _hashes(tmp_path / "full")


def test_kill_at_a_random_moment_then_resume(model, tmp_path):
    """Killed whenever the second block file appears (possibly mid-write of the next files)."""
    folder, text = model
    _cli(folder, text, tmp_path / "full", "gptq")
    out = tmp_path / "q"
    proc = subprocess.Popen(_cmd(folder, text, out, "gptq"), env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (work_path(out) / "block-00001.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _run(_cmd(folder, text, out, "gptq")).returncode == 0
    assert _hashes(out) == _hashes(tmp_path / "full")


def _interrupt_at(block: int):
    def progress(stage, done, total):
        if stage == "blocks" and done == block:
            raise KeyboardInterrupt
    return progress


def test_changed_seed_refuses_and_no_resume_starts_over(model, tmp_path):
    folder, text = model
    out = tmp_path / "q"
    kw = dict(scheme={"bits": 4, "group_size": 32}, device="cpu")
    calib = {"dataset": str(text), "nsamples": 4, "seqlen": 32, "batch_size": 2}
    with pytest.raises(KeyboardInterrupt):
        quantize(folder, "gptq", out, calib=calib, progress=_interrupt_at(1), **kw)
    assert (work_path(out) / "block-00000.safetensors").is_file()
    r = CliRunner().invoke(app, ["quantize", str(folder), "-o", str(out), "-m", "gptq", "--bits", "4", "--group-size",
                                 "32", "--dataset", str(text), "--device", "cpu", *CALIB, "--seed", "1"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "(calibration.seed: 0, now 1)" in lines[0] and "--no-resume" in lines[0], lines
    s = quantize(folder, "gptq", out, calib={**calib, "seed": 1}, resume=False, **kw)
    assert s["resume"]["resumed_at_block"] == 0 and not work_path(out).exists()


def test_crash_during_the_save_resumes_with_nothing_left_to_quantize(model, tmp_path, monkeypatch):
    from quantkit.formats.checkpoint import PackedArtifact

    folder, text = model
    kw = dict(scheme={"bits": 4, "group_size": 32}, device="cpu",
              calib={"dataset": str(text), "nsamples": 4, "seqlen": 32, "batch_size": 2})
    quantize(folder, "gptq", tmp_path / "full", **kw)
    save = PackedArtifact.save

    def broken(self, folder, *a):
        raise OSError("disk full")

    monkeypatch.setattr(PackedArtifact, "save", broken)
    with pytest.raises(OSError):
        quantize(folder, "gptq", tmp_path / "q", **kw)
    assert json.loads((work_path(tmp_path / "q") / "state.json").read_text())["done"] == 4
    monkeypatch.setattr(PackedArtifact, "save", save)
    s = quantize(folder, "gptq", tmp_path / "q", **kw)
    assert s["resume"]["resumed_at_block"] == 4
    assert _hashes(tmp_path / "q") == _hashes(tmp_path / "full")


def test_a_work_folder_is_used_by_one_run_at_a_time(tmp_path):
    out = tmp_path / "q"
    work_path(out).mkdir()
    (work_path(out) / "fingerprint.json").write_text(json.dumps({"seed": 0}))
    first = WorkFolder(out, lambda: {"seed": 0})
    with pytest.raises(ResumeError, match="another quantkit run is using"):
        WorkFolder(out, lambda: {"seed": 0})
    first.close()
    WorkFolder(out, lambda: {"seed": 0}).close(remove=True)
    assert not work_path(out).exists()


def test_the_refusal_names_what_changed(tmp_path):
    out = tmp_path / "q"
    work_path(out).mkdir()
    recorded = {"model": {"model.safetensors": "aa", "config.json": "cc"}, "scheme": {"bits": 4}}
    (work_path(out) / "fingerprint.json").write_text(json.dumps(recorded))
    with pytest.raises(ResumeError, match=r"\(model file model.safetensors: content changed\); pass --no-resume"):
        WorkFolder(out, lambda: {**recorded, "model": {"model.safetensors": "bb", "config.json": "cc"}})
    with pytest.raises(ResumeError, match=r"\(scheme.bits: 4, now 3\)"):
        WorkFolder(out, lambda: {**recorded, "scheme": {"bits": 3}})
    WorkFolder(out, lambda: recorded, resume=False).close()
    assert not work_path(out).exists()
