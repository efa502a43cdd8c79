"""Exact conversions on the real SmolLM2-135M at w4g64: GPTQ -> AWQ -> compressed-tensors -> GPTQ v2 -> GPTQ, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from quantkit.api import quantize
from quantkit.convert import convert
from quantkit.loading import load
from quantkit.formats.qlinear import QuantLinear

pytestmark = pytest.mark.slow


@torch.no_grad()
def snapshot(folder):
    model = load(folder)
    ids = torch.arange(64).reshape(1, 64) * 7 % 49152
    weights = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return weights, model(ids).logits


def test_exact_chain_w4g64(tmp_path):
    src = tmp_path / "gptq"
    quantize("smollm2-135m", "rtn", src, scheme="w4g64", device="cpu")
    ref_w, ref_l = snapshot(src)
    assert len(ref_w) == 30 * 7
    prev = src
    for fmt in ("awq", "compressed-tensors", "gptq-v2", "gptq"):
        res = convert(prev, fmt, tmp_path / f"chain-{fmt}")
        assert res.exact
        w, logits = snapshot(res.out)
        assert all(torch.equal(w[k], ref_w[k]) for k in ref_w), fmt
        assert torch.equal(logits, ref_l), fmt
        prev = res.out
    # the chain ends where it started: the very same packed tensors
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(prev / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_gguf_q4_1_from_w4g32_keeps_grid(tmp_path):
    src = tmp_path / "gptq"
    quantize("smollm2-135m", "rtn", src, scheme="w4g32", device="cpu")
    res = convert(src, "gguf", tmp_path / "m.gguf", gguf_type="q4_1", verify=True, verify_windows=2)
    assert res.exact and res.provenance["grid_kept"] == 210 and res.provenance["requantized"] == 0
    assert res.verify["top1"] > 0.97 and res.verify["kl"] < 1e-3
