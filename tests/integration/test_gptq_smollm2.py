"""GPTQ on the real SmolLM2-135M (small calibration so it stays well under 2 minutes on 2 idle cores).

The weights of this model already lie on a 4-bit group-32 grid, so w4g64 is the
meaningful setting: GPTQ must beat RTN there on perplexity and KL to the base.
"""

import json
import math

import pytest

from quantkit.api import quantize
from quantkit.eval.runner import evaluate_paths

pytestmark = pytest.mark.slow


def test_gptq_w4g64_beats_rtn(tmp_path):
    calib = {"nsamples": 16, "seqlen": 256, "batch_size": 8}
    summary = quantize("smollm2-135m", "gptq", tmp_path / "gptq", scheme="w4g64", calib=calib, device="cpu")
    quantize("smollm2-135m", "rtn", tmp_path / "rtn", scheme="w4g64", device="cpu")
    assert summary["calibration"]["nsamples"] == 16
    prov = json.loads((tmp_path / "gptq" / "quantkit.json").read_text())
    assert prov["method"] == "gptq" and len(prov["calibration"]["sha256"]) == 64
    result = evaluate_paths([str(tmp_path / "gptq"), str(tmp_path / "rtn")], base="smollm2-135m",
                            max_windows=4, device="cpu")
    base, gptq, rtn = result["rows"]
    assert all(math.isfinite(r["ppl"]) for r in (base, gptq, rtn))
    assert gptq["ppl"] < rtn["ppl"]
    assert gptq["kl"] < rtn["kl"]
