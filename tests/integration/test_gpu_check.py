"""scripts/gpu-check.sh: one line and exit 0 without CUDA; with --device cpu --dry-run, the whole check on tiny models.

The dry run goes through the same paths as on a GPU: a fresh venv with quantkit installed from this tree,
`quantkit quantize` and `quantkit eval --speed` as subprocesses, the registry's kernels against the reference
module, the table as Markdown and JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit.kernels import KERNELS
from quantkit.kernels.cpu import CpuInt4

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
from gpucheck import kernelcheck  # noqa: E402

METHODS = ("rtn", "gptq", "awq")


def run_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_VENV=str(tmp_path / "venv"),
               GPU_CHECK_WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=2400,
                          check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_it_prints_one_line_and_exits_0(tmp_path):
    r = run_script(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [gpu_check.NO_CUDA]
    assert "no CUDA device" in gpu_check.NO_CUDA
    assert not (tmp_path / "venv").exists() and not (tmp_path / "out").exists()  # nothing installed or written


def test_dry_run_on_cpu_runs_every_step(tmp_path):
    # a generous budget: this checks the plumbing, and a CI machine may be shared (the run takes 1-2 minutes)
    r = run_script(tmp_path, "--device", "cpu", "--dry-run", "--budget", "1800")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert result["ok"] and result["failures"] == [] and result["dry_run"]
    assert all(s["ok"] for s in result["steps"])
    # quantkit ran from this tree, in the venv the script made
    assert Path(result["environment"]["quantkit_path"]) == ROOT / "quantkit"
    assert any(s["log"] and "venv/bin/quantkit" in Path(s["log"]).read_text() for s in result["steps"])

    rows = {row["method"].split()[0]: row for row in result["rows"]}
    assert set(rows) == {"base", *METHODS}
    assert rows["base"]["ppl"] > 0 and rows["base"]["tps"] > 0 and rows["base"]["kl"] == 0
    for method in METHODS:
        row = rows[method]
        summary = json.loads((tmp_path / "work" / "checkpoints" / "llama-tiny" / f"{method}.json").read_text())
        assert summary["device"] == "cpu" and summary["peak_device_bytes"] is None
        assert row["quantize_s"] == summary["quantize_seconds"] > 0
        for key in ("ppl", "ttft_ms", "tps", "throughput_tps", "eval_peak_mib"):
            assert row[key] > 0, (method, key)
        assert 0 <= row["kl"] < 1
        assert row["kernels"] == {"cpu-int4": 14}  # 2 blocks x 7 Linears, served by the fast kernel
        assert 0 < row["rel_dlogit"] < kernelcheck.FAST_LOGIT_TOL and row["max_abs_dlogit"] > 0
        assert row["status"] == "ok" and row["scheme"] == "w4g128"

    walked = {k["kernel"]: k for k in result["kernels"]}
    assert set(walked) == {name for name, cls in KERNELS.items() if "cpu" in cls.devices}
    for name in ("cpu-int4", "cpu-int8", "cpu-int8-grouped", "dense"):
        assert walked[name]["status"] == "ok" and walked[name]["served"] > 0, walked[name]
        assert walked[name]["worst_ratio"] < 1

    md = (tmp_path / "out" / "gpu-check.md").read_text()
    assert md.startswith("# quantkit GPU check: PASS")
    assert "| model | method | scheme | quantize s | quantize peak MiB |" in md
    assert "| llama-tiny | gptq |" in r.stdout  # the table is printed too


class OffKernel(CpuInt4):
    """cpu-int4 with a 2% gain error: what a wrong scale packing looks like."""

    kernel_name = "test-off-by-2pct"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return super().matmul(x) * 1.02


def test_a_kernel_off_the_reference_fails_the_walk(monkeypatch):
    monkeypatch.setitem(KERNELS, OffKernel.kernel_name, OffKernel)  # registered later: walked with no edit
    walked = {s.kernel: s for s in kernelcheck.check_kernels([(64, 128)], torch.device("cpu"))}
    assert walked["test-off-by-2pct"].status == "FAIL" and walked["test-off-by-2pct"].failures
    assert "rel err" in walked["test-off-by-2pct"].note
    assert walked["cpu-int4"].status == "ok" and walked["cpu-int4"].served > 0


def test_a_spent_budget_fails_the_run_with_the_table_written(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--dry-run", "--budget", "0", "--out", str(tmp_path / "out"),
                         "--work", str(tmp_path / "work")])
    assert rc == 1
    result = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert not result["ok"] and all("time budget" in f for f in result["failures"])
    assert (tmp_path / "out" / "gpu-check.md").read_text().startswith("# quantkit GPU check: FAIL")


def test_cpu_without_dry_run_is_refused():
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--device", "cpu"])
    assert exc.value.code == 2


def test_linear_shapes_of_the_1b_profile():
    from gpucheck import build

    cfg = build.llama_config(build.GPU).to_dict()
    assert build.linear_shapes(cfg) == [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]
    assert build.preset_for(build.linear_shapes(cfg), "w4g128") == "w4g128"
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
    assert build.linear_shapes(smollm2) == [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    assert build.preset_for(build.linear_shapes(smollm2), "w4g128") == "w4g64"  # 128 does not divide 576
