"""MoE through the CLI and the other paths: --moe-* flags, the --json coverage, `quantkit info`'s table,
one-line refusals, and --offload disk reading the hub's per-expert tensors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantkit.api import quantize
from quantkit.cli.main import app
from tests.tiny import write_text
from tests.unit.moe_models import make_moe

runner = CliRunner()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture(scope="module")
def starved(tmp_path_factory):
    return make_moe(tmp_path_factory.mktemp("mixtral") / "m", "MixtralForCausalLM", starve=True)


def _calib_flags(text):
    return ["--dataset", str(text), "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--device", "cpu"]


def _one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_cli_flags_json_coverage_and_info_table(starved, text, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(starved), "-m", "gptq", "--preset", "w4g32", "--moe-min-tokens", "200",
                            "-o", str(out), "--json", "-", "--quiet", *_calib_flags(text)])
    assert r.exit_code == 0, r.output
    moe = json.loads(r.stdout)["moe"]
    assert moe["min_tokens"] == 200 and moe["mode"] == "routed"
    # 128 tokens x top-2 over 4 experts: no expert reaches 200, so every one falls back (and is named)
    assert len(moe["rtn_fallback"]) == 8 and "model.layers.0.mlp.experts.2" in moe["rtn_fallback"]
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0, r.output
    assert "MoE expert coverage" in r.stdout and "model.layers.0.mlp.experts" in r.stdout
    assert "0, 1, 2, 3" in r.stdout  # the fallback column names the experts
    r = runner.invoke(app, ["info", str(out), "--json", "-"])
    assert json.loads(r.stdout)["quantkit"]["moe"]["tokens"]["model.layers.0.mlp.experts"][2] == 0


def test_bad_moe_flags_are_one_line(starved, tmp_path):
    def run(*args):
        return runner.invoke(app, ["quantize", str(starved), *args])

    r = run("-m", "gptq", "--moe-calibration", "some", "-o", str(tmp_path / "a"))
    _one_line_error(r, "--moe-calibration")
    r = run("-m", "awq", "--moe-min-tokens", "-1", "-o", str(tmp_path / "b"))
    _one_line_error(r, "--moe-min-tokens")
    r = run("-m", "rtn", "--moe-calibration", "all", "-o", str(tmp_path / "c"))
    _one_line_error(r, "does not apply to method rtn")


def test_bnb_refuses_moe(starved, tmp_path):
    r = runner.invoke(app, ["quantize", str(starved), "-m", "nf4", "-o", str(tmp_path / "q"), "--device", "cpu"])
    _one_line_error(r, "fused 3-D experts")
    assert not (tmp_path / "q").exists()


def test_offload_disk_matches_in_memory(starved, text, tmp_path):
    """Blocks streamed from the float folder's hub-named per-expert shards give the same checkpoint bytes."""
    runs = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        summary = quantize(starved, "gptq", out, scheme={"bits": 4, "group_size": 32}, device="cpu",
                           calib={"dataset": str(text), "nsamples": 4, "seqlen": 32, "batch_size": 2},
                           options={"offload": offload})
        runs[offload] = ((out / "model.safetensors").read_bytes(), summary["moe"])
    assert runs["none"] == runs["disk"]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_killed_run_resumes_with_the_whole_coverage(starved, text, tmp_path, method):
    """The token counts travel with each finished block: a resumed run writes the same checkpoint and report."""
    import signal

    from tests.unit.test_resume import _cli, _cmd, _hashes, _run

    extra = ("--n-grid", "4") if method == "awq" else ()
    _cli(starved, text, tmp_path / "full", method, *extra)
    out = tmp_path / "killed"
    killed = _run(_cmd(starved, text, out, method, *extra), QUANTKIT_TEST_KILL_AT_BLOCK="1")
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(_cmd(starved, text, out, method, *extra))
    assert resumed.returncode == 0, resumed.stderr
    moe = json.loads((out / "quantkit.json").read_text())["moe"]
    assert list(moe["tokens"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert moe["rtn_fallback"] == ["model.layers.0.mlp.experts.2"]  # decided in the killed run's block 0
    assert _hashes(out) == _hashes(tmp_path / "full")
