"""Shared set-up of the fault catalogue: one tiny model, its uninterrupted checkpoints (the bytes a resumed
run must reproduce) and work folders left by interrupted runs (copied, then damaged, by each case)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.calib.workdir import work_path
from quantkit.cli.main import app
from tests.tiny import llama_config, make_model, write_text

CALIB = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "2"]
STOP_AT = 3  # interrupted runs keep blocks 0..2 and the inputs of block 3 (of 4)


def quantize_args(model: Path, text: Path, out: Path, method: str = "gptq", *extra: str) -> list[str]:
    return ["-q", "quantize", str(model), "-o", str(out), "-m", method, "--bits", "4", "--group-size", "32",
            "--dataset", str(text), "--device", "cpu", *CALIB, *extra]


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a write left behind under `folder` (anything named .*.tmp*, .*.old-*)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    return make_model(base / "m", llama_config(layers=4)), write_text(base / "calib.txt")


@pytest.fixture(scope="session")
def reference(tiny, tmp_path_factory):
    """method -> the uninterrupted run's checkpoint folder."""
    model, text = tiny
    base = tmp_path_factory.mktemp("reference")
    out = {}
    for method in ("gptq", "awq"):
        r = invoke(quantize_args(model, text, base / method, method))
        assert r.exit_code == 0, r.output
        out[method] = base / method
    return out


@pytest.fixture(scope="session")
def partial(tiny, tmp_path_factory, reference):
    """method -> a work folder left by a run interrupted after block STOP_AT - 1 (the CLI run, with its
    calibration stopped by a KeyboardInterrupt from the pipeline's progress)."""
    import quantkit.calib.pipeline as pipeline

    model, text = tiny
    base = tmp_path_factory.mktemp("partial")
    out = {}
    real = pipeline.release_heap
    for method in ("gptq", "awq"):
        calls = {"n": 0}

        def stop_after_block():  # run_sequential calls release_heap once after each finished block
            calls["n"] += 1
            if calls["n"] == STOP_AT:
                raise KeyboardInterrupt

        pipeline.release_heap = stop_after_block
        try:
            r = invoke(quantize_args(model, text, base / method, method))
        finally:
            pipeline.release_heap = real
        assert r.exit_code == 130, r.output
        assert (work_path(base / method) / f"inputs-{STOP_AT:05d}.safetensors").is_file()
        out[method] = work_path(base / method)
    return out


def copy_partial(partial_folder: Path, out: Path) -> Path:
    """A copy of an interrupted run's work folder as `out`'s (the same fingerprint: paths are not in it)."""
    shutil.copytree(partial_folder, work_path(out))
    return work_path(out)
