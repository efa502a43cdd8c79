"""GPTQModel loads a quantkit GPTQ checkpoint with per-module grids (the `dynamic` config that `--target-bpw`
writes), builds each Linear on the grid the checkpoint stores it on, and computes what quantkit.load does.

GPTQModel's own loader (`GPTQModel.load`) reads `dynamic`; transformers 5 + optimum 2 (AutoModelForCausalLM)
do not: they build every Linear on the base grid. GPTQModel.load takes asymmetric GPTQ v1 checkpoints only
from its own quantizer, so these cases are symmetric.

Runs in the separate interop environment (scripts/setup-interop.sh):
    GPTQMODEL_CPU_WORKERS=2 .venv-interop/bin/python -m pytest tests/interop/test_dynamic_interop.py
and skips cleanly anywhere gptqmodel cannot be imported.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from tests.interop.needs import require  # noqa: E402
require("gptqmodel", "optimum")

import quantkit
from quantkit.api import quantize
from tests.tiny import llama_config, make_model

CASES = {  # name -> (base scheme, per-module grids, --target-bpw); GPTQ unless METHODS says otherwise
    "w4-w8-mixed": ({"bits": 4, "group_size": 64, "sym": True}, {
        "model.layers.0.self_attn.q_proj": {"bits": 8, "group_size": 64},
        "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 32},
        "model.layers.1.self_attn.v_proj": {"bits": 4, "group_size": 32},
        "model.layers.1.mlp.gate_proj": {"bits": 8, "group_size": -1}}, None),
    "w3-override": ({"bits": 4, "group_size": 32, "sym": True}, {
        "model.layers.1.mlp.up_proj": {"bits": 3, "group_size": 32}}, None),
    "target-bpw": ({"bits": 4, "group_size": 64, "sym": True}, None, 5.0),
    # SignRound tunes each Linear on its own grid (signed scales where a group's extreme is positive), then the
    # end-to-end stage reads every Linear back on its own grid
    "signround-target-bpw-e2e": ({"bits": 4, "group_size": 64, "sym": True}, None, 5.0),
}
METHODS = {"signround-target-bpw-e2e": ("signround", {"iters": 4, "e2e_steps": 2})}


@pytest.fixture(scope="module")
def dynamic_checkpoints(tmp_path_factory, text_file):
    folder = make_model(tmp_path_factory.mktemp("interop-dynamic") / "llama",
                        llama_config(hidden=128, inter=256, architectures=["LlamaForCausalLM"]))
    calib = {"dataset": str(text_file), "nsamples": 8, "seqlen": 32, "batch_size": 4}
    outs = {}
    for name, (scheme, overrides, target) in CASES.items():
        method, options = METHODS.get(name, ("gptq", None))
        out = folder.parent / f"{method}-{name}"
        quantize(folder, method, out, scheme={**scheme, **({"overrides": overrides} if overrides else {})},
                 calib=calib, options=options, device="cpu", target_bpw=target)
        outs[name] = out
    return outs


@pytest.mark.parametrize("case", list(CASES))
def test_gptqmodel_reads_the_dynamic_config_and_matches_quantkit_load(dynamic_checkpoints, case):
    from gptqmodel import BACKEND, GPTQModel

    out = dynamic_checkpoints[case]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"], qc  # every case stores Linears on more than one grid
    ours = quantkit.load(out, dtype=torch.float16)
    hf = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()
    theirs = {n: m for n, m in hf.named_modules() if hasattr(m, "qweight") and not isinstance(m, torch.nn.Linear)}
    assert len(theirs) == 2 * 7, sorted(theirs)
    for name, mod in theirs.items():  # gptqmodel built each Linear on the grid the checkpoint stores it on
        want = ours.get_submodule(name)
        assert (mod.bits, mod.group_size) == (want.bits, want.in_features if want.group_size == -1
                                              else want.group_size), name
    assert len({(m.bits, m.group_size) for m in theirs.values()}) > 1
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids).logits.float()
        got = hf(ids).logits.float()
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-3, rel
