"""transformers (+ optimum + GPTQModel) loads a quantkit GPTQ checkpoint and computes what quantkit.load does.

Runs in the separate interop environment (scripts/setup-interop.sh):
    GPTQMODEL_CPU_WORKERS=2 .venv-interop/bin/python -m pytest tests/interop
and skips cleanly anywhere gptqmodel cannot be imported.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from tests.interop.needs import require  # noqa: E402
require("gptqmodel", "optimum")

import quantkit
from quantkit.api import quantize
from tests.tiny import llama_config, make_model

CASES = {  # name -> scheme
    "w4g32": {"bits": 4, "group_size": 32},
    "w4g32-act": {"bits": 4, "group_size": 32, "desc_act": True},
    "w4g32-act-sym": {"bits": 4, "group_size": 32, "desc_act": True, "sym": True},
    "w8-perchannel": {"bits": 8, "group_size": -1},
    "w3g32-act": {"bits": 3, "group_size": 32, "desc_act": True},
    "signround-w4g32": {"bits": 4, "group_size": 32},
    "signround-w3g32-sym": {"bits": 3, "group_size": 32, "sym": True},
    "signround-w4g32-e2e-rounding": {"bits": 4, "group_size": 32},
    "signround-w4g32-sym-e2e": {"bits": 4, "group_size": 32, "sym": True},
    "signround-w4g32-e2e-embedding": {"bits": 4, "group_size": 32},  # the tied embedding tuned end to end
    "signround-w4g32-e2e-relative-norms": {"bits": 4, "group_size": 32},  # the norms' gains stepped in relative terms
    "signround-w4g32-prefix": {"bits": 4, "group_size": 32},
    "signround-w4g32-e2e-token-fraction": {"bits": 4, "group_size": 32},  # a share of the positions in the KL
    "w4g32-rotated": {"bits": 4, "group_size": 32, "rotation": "hadamard"},  # untied head, norms at 1
    "signround-w4g32-rotated-e2e": {"bits": 4, "group_size": 32, "rotation": "hadamard"},
    "w4g32-e2e": {"bits": 4, "group_size": 32},  # GPTQ's codes, scales and norms tuned end to end
    "w4g32-rotated-e2e": {"bits": 4, "group_size": 32, "rotation": "hadamard"},
    "w4g32-rotated-float-target": {"bits": 4, "group_size": 32, "rotation": "hadamard"},  # GPTAQ's targets
}
# cases made by another method than gptq, with its options (same GPTQ checkpoint format)
METHODS = {
    "signround-w4g32": ("signround", {"iters": 4, "e2e_steps": 2}),
    "signround-w3g32-sym": ("signround", {"iters": 4, "tune_norms": False}),
    "signround-w4g32-e2e-rounding": ("signround", {"iters": 4, "e2e_steps": 3, "e2e_rounding_lr": 0.05}),
    "signround-w4g32-sym-e2e": ("signround", {"iters": 4, "e2e_steps": 2}),  # negative scales where the extreme is > 0
    "signround-w4g32-e2e-embedding": ("signround", {"iters": 4, "e2e_steps": 2, "e2e_embedding_lr": 1e-4}),
    "signround-w4g32-e2e-relative-norms": ("signround", {"iters": 4, "e2e_steps": 2, "e2e_norms": "relative"}),
    "signround-w4g32-prefix": ("signround", {"iters": 4, "window_tokens": 16, "windows_per_step": 6}),
    "signround-w4g32-e2e-token-fraction": ("signround", {"iters": 4, "e2e_steps": 2, "e2e_token_fraction": 0.25}),
    "signround-w4g32-rotated-e2e": ("signround", {"iters": 4, "e2e_steps": 2}),
    "w4g32-e2e": ("gptq", {"e2e_steps": 2}),
    "w4g32-rotated-e2e": ("gptq", {"e2e_steps": 2}),
    "w4g32-rotated-float-target": ("gptq", {"float_target": True, "e2e_steps": 2}),
}


@pytest.fixture(scope="module")
def gptq_checkpoints(tmp_path_factory, text_file):
    folder = make_model(tmp_path_factory.mktemp("interop") / "llama",
                        llama_config(hidden=128, inter=256, architectures=["LlamaForCausalLM"]))
    calib = {"dataset": str(text_file), "nsamples": 8, "seqlen": 32, "batch_size": 4}
    outs = {}
    for name, scheme in CASES.items():
        out = folder.parent / f"gptq-{name}"
        method, options = METHODS.get(name, ("gptq", {}))
        quantize(folder, method, out, scheme=scheme, calib=calib, options=options, device="cpu")
        outs[name] = out
    return outs


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_matches_quantkit_load(gptq_checkpoints, case):
    from transformers import AutoModelForCausalLM

    out = gptq_checkpoints[case]
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = quantkit.load(out, dtype=torch.float16)
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16).eval()
    replaced = [n for n, m in hf.named_modules() if hasattr(m, "qweight") and not isinstance(m, torch.nn.Linear)]
    assert len(replaced) == 2 * 7, replaced  # every block Linear went through the GPTQ loader, lm_head did not
    if CASES[case].get("desc_act"):
        g_idx = next(m for n, m in hf.named_modules() if n.endswith("layers.0.mlp.down_proj")).g_idx
        assert not torch.equal(g_idx.cpu(), torch.arange(g_idx.numel(), dtype=g_idx.dtype) // 32)
    with torch.no_grad():
        want = ours(ids).logits.float()
        got = hf(ids).logits.float()
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-3, rel
