"""A third-party method (tests/toy_method.py) registered through the `quantkit.methods` entry point, with no
edit anywhere else: listed, planned, quantized, offloaded, resumed after a SIGKILL, and described by the zoo."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import quantkit
from quantkit.calib.workdir import work_path
from quantkit.cli.main import app
from tests.tiny import llama_config, make_model

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """An installed distribution as pip leaves one: its dist-info with the entry point, on sys.path."""
    site = tmp_path_factory.mktemp("site")
    info = site / "toy_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[quantkit.methods]\ntoy = tests.toy_method:Toy\n")
    return site


@pytest.fixture(autouse=True)
def installed(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("toy") / "m", llama_config(layers=4))


def _args(model, text, out, *extra):
    return ["quantize", str(model), "-o", str(out), "-m", "toy", "--preset", "w4g32", "--dataset", str(text),
            "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--device", "cpu", "-q", *extra]


def _cli(*args):
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r


def _hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.name not in skip}


def test_listed_with_its_options():
    methods = {m["name"]: m for m in json.loads(_cli("methods", "--json", "-").stdout)}
    toy = methods["toy"]
    assert toy["needs_calibration"] and toy["formats"] == ["gptq"]
    assert {o["name"]: o["default"] for o in toy["options"]} == {
        "offload": "none", "moe_calibration": "routed", "moe_min_tokens": 16, "shrink": 0.9}
    assert "clip each group" in _cli("methods", "toy").stdout


def test_planned_from_its_declarations(model, text_file, tmp_path):
    plan = json.loads(_cli(*_args(model, text_file, tmp_path / "q", "--plan", "--json", "-")).stdout)
    block = {s["name"]: s for s in plan["stages"]}["block + activations"]
    assert "toy: recorded input rows" in block["detail"] and plan["settings"]["method"] == "toy"
    assert not (tmp_path / "q").exists()


def test_quantized_offloaded_and_options_checked(model, text_file, tmp_path):
    _cli(*_args(model, text_file, tmp_path / "mem", "--shrink", "0.8"))
    _cli(*_args(model, text_file, tmp_path / "disk", "--opt", "shrink=0.8", "--offload", "disk"))
    records = ("quantkit.json", "quantkit_recipe.yaml")  # they record the offload option
    assert _hashes(tmp_path / "mem", records) == _hashes(tmp_path / "disk", records)
    record = json.loads((tmp_path / "mem" / "quantkit.json").read_text())
    assert record["method"] == "toy" and record["options"]["shrink"] == 0.8
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(quantkit.load(tmp_path / "mem")(input_ids=ids).logits).all()
    r = runner.invoke(app, _args(model, text_file, tmp_path / "bad", "--shrink", "2"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --shrink: "), r.output


def test_resumed_after_sigkill(model, text_file, tmp_path, plugin_dir):
    _cli(*_args(model, text_file, tmp_path / "full"))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "quantkit", *_args(model, text_file, out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugin_dir)])}
    killed = subprocess.run(cmd, env={**env, "QUANTKIT_TEST_KILL_AT_BLOCK": "2"}, cwd=ROOT, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((work_path(out) / "state.json").read_text())["done"] == 2
    resumed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _hashes(out) == _hashes(tmp_path / "full")


def test_described_by_the_zoo(model, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({
        "name": "toy", "method": "toy", "preset": "w4g32", "options": {"shrink": 0.8},
        "calibration": {"dataset": str(text_file), "nsamples": 4, "seqlen": 32}}))
    zoo = {"defaults": {"evaluation": {"dataset": str(text_file), "seqlen": 32, "max_windows": 2}},
           "models": [{"model": str(model), "name": "tiny", "license": "mit", "base_model": "org/tiny",
                       "recipes": ["toy.yaml"]}]}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    _cli("zoo", "build", str(tmp_path / "zoo.yaml"), "--out", str(tmp_path / "zoo"), "--device", "cpu")
    card = (tmp_path / "zoo" / "tiny-toy" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert {"toy", "4-bit", "w4g32"} <= set(meta["tags"])
    assert meta["quantization"]["method"] == "toy" and meta["quantization"]["bits"] == 4
    entry = json.loads((tmp_path / "zoo" / "index.json").read_text())["entries"][0]
    assert entry["method"] == "toy" and entry["scheme"] == "w4g32 asym" and entry["status"] == "passed"
