"""`quantkit zoo build|verify|publish` on a tiny random model: idempotence, rebuild scope, gates, hashes."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.zoo.entry import MANIFEST
from quantkit.zoo.recipe import RECIPE_FILE

runner = CliRunner()


def make_zoo(folder, model, text, gates=None, gptq_nsamples=4):
    """A zoo of two entries (rtn, gptq) over the tiny model, evaluated on 4 windows of 32 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rtn.yaml").write_text(yaml.safe_dump({"name": "rtn", "method": "rtn", "scheme": {"bits": 4, "group_size": 32}}))
    (folder / "gptq.yaml").write_text(yaml.safe_dump({
        "name": "gptq", "method": "gptq", "scheme": {"bits": 4, "group_size": 32},
        "calibration": {"dataset": str(text), "nsamples": gptq_nsamples, "seqlen": 32}}))
    zoo = {"defaults": {"evaluation": {"dataset": str(text), "seqlen": 32, "max_windows": 4}, "gates": gates or {}},
           "models": [{"model": str(model), "name": "tiny", "license": "mit", "base_model": "org/tiny",
                       "recipes": ["rtn.yaml", "gptq.yaml"]}]}
    (folder / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    return folder / "zoo.yaml"


def build(zoo, out, *extra):
    r = runner.invoke(app, ["zoo", "build", str(zoo), "--out", str(out), "--device", "cpu",
                            "--json", str(out.parent / "report.json"), *extra])
    report = json.loads((out.parent / "report.json").read_text()) if (out.parent / "report.json").is_file() else None
    return r, report


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))


def test_build_is_idempotent_and_rebuilds_only_what_changed(tiny_llama, text_file, tmp_path):
    zoo, out = make_zoo(tmp_path / "r", tiny_llama, text_file), tmp_path / "zoo"
    r, rep = build(zoo, out, "--jobs", "2")  # the process pool; every later build runs in this process
    assert r.exit_code == 0, r.output
    assert sorted(rep["built"]) == ["tiny-gptq", "tiny-rtn"] and rep["up_to_date"] == []
    for name in ("tiny-rtn", "tiny-gptq"):
        m = json.loads((out / name / MANIFEST).read_text())
        assert set(m["files"]) >= {"model.safetensors", "config.json", "README.md", RECIPE_FILE, "quantkit.json"}
        assert m["inputs"]["base_files"]["model.safetensors"] and m["inputs"]["quantkit_version"]
        assert m["metrics"]["ppl"] > 0 and m["metrics"]["kl"] >= 0 and m["metrics"]["base_ppl"] > 0
    assert json.loads((out / "tiny-gptq" / MANIFEST).read_text())["inputs"]["calibration_sha256"]
    assert json.loads((out / "tiny-rtn" / MANIFEST).read_text())["inputs"]["calibration_sha256"] is None
    card = (out / "tiny-gptq" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/tiny" and meta["license"] == "mit" and "gptq" in meta["tags"]
    assert meta["quantization"]["bits"] == 4 and meta["quantization"]["calibration"]["nsamples"] == 4
    assert "| ppl |" in card.replace("ppl |", "ppl |") and "```yaml" in card
    index = json.loads((out / "index.json").read_text())
    assert [e["status"] for e in index["entries"]] == ["passed", "passed"]
    assert (out / "index-plot.png").is_file() and "index-plot.png" in (out / "index.md").read_text()
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    r, rep = build(zoo, out)  # nothing changed: nothing rebuilt, nothing touched
    assert r.exit_code == 0, r.output
    assert rep["built"] == [] and sorted(rep["up_to_date"]) == ["tiny-gptq", "tiny-rtn"]
    assert "nothing to rebuild" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp

    make_zoo(tmp_path / "r", tiny_llama, text_file, gptq_nsamples=6)  # change one recipe
    r, rep = build(zoo, out)
    assert r.exit_code == 0, r.output
    assert rep["built"] == ["tiny-gptq"] and rep["up_to_date"] == ["tiny-rtn"]
    assert "recipe changed" in r.stderr
    assert (out / "tiny-rtn" / MANIFEST).stat().st_mtime_ns == stamp[out / "tiny-rtn" / MANIFEST]

    r, rep = build(zoo, out, "--force", "tiny-rtn")
    assert r.exit_code == 0, r.output
    assert rep["built"] == ["tiny-rtn"] and rep["up_to_date"] == ["tiny-gptq"]
    r, _ = build(zoo, out, "--force", "nope")
    assert r.exit_code == 2 and "--force nope: no such entry" in r.stderr

    r = runner.invoke(app, ["zoo", "verify", str(out)])
    assert r.exit_code == 0, r.output


def test_failed_gate_exits_1_and_is_not_published(tiny_llama, text_file, tmp_path):
    zoo, out = make_zoo(tmp_path / "r", tiny_llama, text_file), tmp_path / "zoo"
    # gptq gets an impossible KL gate; rtn only gates that can pass
    data = yaml.safe_load(zoo.read_text())
    data["models"][0]["gates"] = {"min_top1": 0.0, "max_kl": 100.0}
    data["models"][0]["recipes"][1] = {"recipe": "gptq.yaml", "gates": {"max_kl": 0.0}}
    zoo.write_text(yaml.safe_dump(data))
    r, rep = build(zoo, out)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("gate failed: ")]
    assert len(lines) == 1 and lines[0].startswith("gate failed: tiny-gptq: KL ") and "> max_kl 0" in lines[0], r.stderr
    assert "internal error" not in r.stderr
    index = json.loads((out / "index.json").read_text())
    status = {e["name"]: e["status"] for e in index["entries"]}
    assert status == {"tiny-rtn": "passed", "tiny-gptq": "failed"} and index["published"] == ["tiny-rtn"]
    assert "failed: KL" in (out / "index.md").read_text()

    r = runner.invoke(app, ["zoo", "publish", str(out), "--repo-prefix", "myorg/", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "would upload" in r.output and "myorg/tiny-rtn" in r.output and "myorg/tiny-gptq" not in r.output
    r = runner.invoke(app, ["zoo", "publish", str(out), "--repo-prefix", "myorg", "--dry-run"])
    assert r.exit_code == 2 and "needs the owner and a slash" in r.stderr

    r, rep = build(zoo, out)  # re-gated without rebuilding: still failing, still exit 1
    assert r.exit_code == 1 and rep["built"] == [] and len(rep["gate_failures"]) == 1


def test_verify_detects_tampering(tiny_llama, text_file, tmp_path):
    zoo, out = make_zoo(tmp_path / "r", tiny_llama, text_file), tmp_path / "zoo"
    data = yaml.safe_load(zoo.read_text())
    data["models"][0]["recipes"] = ["rtn.yaml"]
    zoo.write_text(yaml.safe_dump(data))
    r, _ = build(zoo, out)
    assert r.exit_code == 0, r.output
    weights = out / "tiny-rtn" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    r = runner.invoke(app, ["zoo", "verify", str(out)])
    assert r.exit_code == 1 and "verify failed: tiny-rtn: model.safetensors: sha256 mismatch" in r.stderr
    r = runner.invoke(app, ["zoo", "publish", str(out), "--repo-prefix", "o/", "--dry-run"])
    assert r.exit_code == 2 and "does not verify" in r.stderr
    weights.unlink()
    (out / "tiny-rtn" / "extra.txt").write_text("x")
    r = runner.invoke(app, ["zoo", "verify", str(out)])
    assert r.exit_code == 1
    assert "model.safetensors: missing" in r.stderr and "extra.txt: not in the manifest" in r.stderr
    r, rep = build(zoo, out)  # a damaged entry is incomplete: the next build repairs it
    assert r.exit_code == 0 and rep["built"] == ["tiny-rtn"] and "incomplete" in r.stderr
    assert runner.invoke(app, ["zoo", "verify", str(out)]).exit_code == 0
    r = runner.invoke(app, ["zoo", "verify", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "is not a folder" in r.stderr


DRIVER = """
import pathlib, sys, time

import quantkit.zoo.entry as entry

flag = pathlib.Path(sys.argv[1])


def stuck(*args, **kwargs):  # the checkpoint is written; the build now hangs inside the entry
    flag.write_text("evaluating")
    time.sleep(600)


entry._evaluate = stuck
from quantkit.cli.main import main

main(sys.argv[2:])
"""


def test_sigkill_mid_entry_then_resume(tiny_llama, text_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    zoo, out = make_zoo(tmp_path / "r", tiny_llama, text_file), tmp_path / "zoo"
    driver, flag = tmp_path / "driver.py", tmp_path / "flag"
    driver.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(flag), "zoo", "build", str(zoo), "--out", str(out),
                             "--device", "cpu"], env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert flag.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timed out"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # killed in the middle of tiny-rtn: its checkpoint is staged, nothing looks complete
    assert (out / ".build" / "tiny-rtn" / "checkpoint" / "quantkit.json").is_file()
    assert not (out / "tiny-rtn").exists() and not (out / "tiny-gptq").exists()
    assert list(out.rglob(MANIFEST)) == []
    r = runner.invoke(app, ["zoo", "verify", str(out)])
    assert r.exit_code == 2 and "no readable index.json" in r.stderr

    r, rep = build(zoo, out)
    assert r.exit_code == 0, r.output
    assert sorted(rep["built"]) == ["tiny-gptq", "tiny-rtn"]
    assert rep["resumed"] == {"tiny-rtn": ["checkpoint"]} and "resuming an interrupted build" in r.stderr
    assert not (out / ".build" / "tiny-rtn").exists()
    m = json.loads((out / "tiny-rtn" / MANIFEST).read_text())
    assert set(m["files"]) >= {"model.safetensors", "README.md", RECIPE_FILE} and m["metrics"]["ppl"] > 0
    assert runner.invoke(app, ["zoo", "verify", str(out)]).exit_code == 0
    r, rep = build(zoo, out)
    assert rep["built"] == [] and r.exit_code == 0
