"""AWQ on the real smollm2-135m: a small calibration set, w4g64, better than RTN (slow)."""

from __future__ import annotations

import json

import pytest
import torch

import quantkit
from quantkit.api import quantize
from quantkit.calib import data
from quantkit.eval.quality import evaluate
from quantkit.formats.qlinear import QuantLinear
from quantkit.models.sources import load_model, resolve

pytestmark = pytest.mark.slow


def test_awq_w4g64_beats_rtn_on_smollm2(tmp_path):
    calib = {"dataset": "wiki-vital", "nsamples": 16, "seqlen": 256, "seed": 0}
    quantize("smollm2-135m", "awq", tmp_path / "awq", scheme="w4g64", calib=calib, device="cpu",
             options={"n_grid": 10})
    quantize("smollm2-135m", "rtn", tmp_path / "rtn", scheme="w4g64", device="cpu")
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"], qc["version"]) == (
        "awq", 4, 64, True, "gemm")

    base, tok = load_model(resolve("smollm2-135m"))
    windows = data.test_windows(tok, seqlen=512, max_windows=3)
    awq = quantkit.load(tmp_path / "awq")
    assert sum(isinstance(m, QuantLinear) for m in awq.modules()) == 30 * 7
    q_awq, q_rtn = evaluate([awq, quantkit.load(tmp_path / "rtn")], windows, base=base)
    assert torch.isfinite(torch.tensor([q_awq.ppl, q_awq.kl])).all()
    assert q_awq.ppl < q_rtn.ppl, (q_awq, q_rtn)
    assert q_awq.kl < q_rtn.kl, (q_awq, q_rtn)
