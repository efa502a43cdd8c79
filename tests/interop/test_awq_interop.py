"""transformers (+ GPTQModel's AWQ kernels) loads a quantkit AWQ checkpoint and computes what quantkit.load does.

Runs in the separate interop environment (scripts/setup-interop.sh):
    GPTQMODEL_CPU_WORKERS=2 .venv-interop/bin/python -m pytest tests/interop/test_awq_interop.py
and skips cleanly anywhere gptqmodel cannot be imported.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from tests.interop.needs import require  # noqa: E402
require("gptqmodel")

import quantkit
from quantkit.api import quantize
from tests.tiny import llama_config, make_model


@pytest.fixture(scope="module")
def awq_checkpoints(tmp_path_factory, text_file):
    folder = make_model(tmp_path_factory.mktemp("interop") / "llama",
                        llama_config(hidden=128, inter=256, architectures=["LlamaForCausalLM"]))
    calib = {"dataset": str(text_file), "nsamples": 8, "seqlen": 32, "batch_size": 4}
    outs = {}
    for zero_point in (True, False):
        out = folder.parent / f"awq-zp{int(zero_point)}"
        quantize(folder, "awq", out, scheme={"group_size": 64}, calib=calib, device="cpu",
                 options={"zero_point": zero_point, "n_grid": 10})
        outs[zero_point] = out
    return outs


@pytest.mark.parametrize("zero_point", [True, False])
def test_transformers_matches_quantkit_load(awq_checkpoints, zero_point):
    from transformers import AutoModelForCausalLM

    out = awq_checkpoints[zero_point]
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = quantkit.load(out, dtype=torch.float16)
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16).eval()
    replaced = [n for n, m in hf.named_modules() if hasattr(m, "qweight") and not isinstance(m, torch.nn.Linear)]
    assert len(replaced) == 2 * 7, replaced  # every block Linear went through the AWQ loader, lm_head did not
    with torch.no_grad():
        want = ours(ids).logits.float()
        got = hf(ids).logits.float()
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-3, rel
