"""RTN on the real SmolLM2-135M: w4g64 reloads, scores finite, and beats w3g64."""

import math

import pytest

from quantkit.api import quantize
from quantkit.eval.runner import evaluate_paths

pytestmark = pytest.mark.slow


def test_rtn_w4g64_beats_w3g64(tmp_path):
    for preset in ("w4g64", "w3g64"):
        quantize("smollm2-135m", "rtn", tmp_path / preset, scheme=preset, device="cpu")
    result = evaluate_paths([str(tmp_path / "w4g64"), str(tmp_path / "w3g64")], base="smollm2-135m",
                            max_windows=6, device="cpu")
    base, w4, w3 = result["rows"]
    assert all(math.isfinite(r["ppl"]) for r in (base, w4, w3))
    assert base["ppl"] < w4["ppl"] < w3["ppl"]
    assert w4["ppl"] < 1.3 * base["ppl"]  # the bound: within 30% of the base
    assert w4["kl"] < w3["kl"] and w4["top1"] > w3["top1"]
    assert 4.0 < w4["bits_per_weight"] < 5.0 and 3.0 < w3["bits_per_weight"] < 4.0
