"""llm-compressor as benchmarks/w8a8.py's peer: the checkpoints its peer script (benchmarks/peers/llmc_w8a8.py,
run by .venv-llmc's python, `make venv-llmc`) writes are read by quantkit's evaluator on their exact maths.

For W8A8 (SmoothQuant + GPTQ) and FP8_DYNAMIC on a tiny random Llama, quantized by llm-compressor itself on
quantkit's calibration windows:
- the script's figures (time, RSS, size) are the run's and the checkpoint is int-/float-quantized with dynamic
  per-token input activations, as vLLM reads it;
- `quantkit.load(..., kernel="dense")` (what the benchmark scores) gives the logits that transformers +
  compressed-tensors compute for that checkpoint in llm-compressor's own venv, activation quantization included;
- quantkit's evaluator scores it against the float model.

Skips unless .venv-llmc exists and imports llmcompressor (it is never a quantkit dependency).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.interop.needs import require_python

ROOT = Path(__file__).resolve().parents[2]
LLMC_PY = ROOT / ".venv-llmc" / "bin" / "python"
SCRIPT = ROOT / "benchmarks" / "peers" / "llmc_w8a8.py"
require_python(LLMC_PY, "llmcompressor", "compressed_tensors")

import quantkit  # noqa: E402
from quantkit.formats.qlinear import QuantLinear  # noqa: E402
from tests.tiny import llama_config, make_model  # noqa: E402

# the logits transformers computes for a compressed-tensors checkpoint, in llm-compressor's venv
THEIRS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""
CASES = {"llmc-w8a8": ("int-quantized", "int"), "llmc-fp8dyn": ("float-quantized", "float")}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("llmc") / "llama",
                      llama_config(hidden=128, inter=256, architectures=["LlamaForCausalLM"]))


@pytest.fixture(scope="module")
def peer_runs(tiny, text_file) -> dict[str, tuple[Path, dict]]:
    runs = {}
    for row in CASES:
        out = tiny.parent / row
        res = subprocess.run([str(LLMC_PY), str(SCRIPT), "--row", row, "--model", str(tiny), "--out", str(out),
                              "--dataset", str(text_file), "--nsamples", "8", "--seqlen", "32"],
                             capture_output=True, text=True, env=_env(), cwd=ROOT, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[row] = (out, json.loads(res.stdout.strip().splitlines()[-1]))
    return runs


@pytest.mark.parametrize("row", list(CASES))
def test_peer_script_writes_what_vllm_reads(peer_runs, row):
    out, figures = peer_runs[row]
    fmt, typ = CASES[row]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and group["format"] == fmt and qc["ignore"] == ["lm_head"]
    assert group["weights"] == {**group["weights"], "num_bits": 8, "type": typ, "strategy": "channel"}
    act = group["input_activations"]
    assert (act["num_bits"], act["type"], act["strategy"], act["dynamic"]) == (8, typ, "token", True)
    assert figures["size_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0 < figures["quant_s"] <= figures["process_s"] and figures["cpu_s"] > 0 and figures["peak_rss_mib"] > 100


@pytest.mark.parametrize("row", list(CASES))
def test_quantkit_scores_the_peer_checkpoint_on_its_exact_maths(peer_runs, tiny, tmp_path, row):
    from quantkit.eval.quality import evaluate
    from quantkit.models.sources import load_model, resolve

    out, _ = peer_runs[row]
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    res = subprocess.run([str(LLMC_PY), "-c", THEIRS, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "theirs.pt")],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    ours = quantkit.load(out, dtype=torch.float32, kernel="dense").eval()
    linears = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 14 and all(m.act is not None and m.act.dynamic for m in linears)
    with torch.no_grad():
        mine = ours(ids).logits
    assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-5), float((mine - theirs).abs().max())
    for m in linears:  # without quantized activations the logits differ: both sides really quantize them
        m.act = None
    with torch.no_grad():
        assert float((ours(ids).logits - theirs).abs().max()) > 1e-4

    base, _ = load_model(resolve(str(tiny)), torch.float32)
    scored = quantkit.load(out, dtype=torch.float32, kernel="dense").eval()
    windows = torch.randint(0, 320, (3, 32), generator=torch.Generator().manual_seed(1))
    q = evaluate([base, scored], windows, base=base)
    assert q[0].kl == 0 and 0 < q[1].kl < 1 and 0 < q[1].top1 <= 100 and q[1].ppl > 1
