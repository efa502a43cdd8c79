"""Mixture-of-experts: per-expert swap, the table's expansion, hub names, and GPTQ / AWQ / RTN on tiny
random Mixtral, Qwen3-MoE and Qwen2-MoE models (quantize -> quantkit.load -> the dequantized model's logits),
with every expert calibrated or, when the router starves one, quantized with RTN and reported."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open

import quantkit
from quantkit.errors import CheckpointError
from quantkit.formats.loader import read_tensors
from quantkit.grid import rtn_quantize
from quantkit.models.arch import (ARCHITECTURES, block_linears, block_mappings, block_stages, expert_of, get_arch,
                                  get_blocks)
from quantkit.models.moe import PerExpertMoE, from_hub_names, swap_experts, to_hub_names
from tests.tiny import write_text
from tests.unit.moe_models import logits, make_moe, moe_config, quantize_keep

MOE_ARCHS = ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture(scope="module")
def starved(tmp_path_factory):
    """Tiny Mixtral (2 blocks, 4 experts, top-2) whose block-0 router never picks expert 2."""
    return make_moe(tmp_path_factory.mktemp("mixtral") / "m", "MixtralForCausalLM", starve=True)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_moe(tmp_path_factory.mktemp("qwen3moe") / "m", "Qwen3MoeForCausalLM")


def _random(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(moe_config(arch)).eval()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_swapped_experts_compute_what_the_fused_ones_do(arch):
    model = _random(arch)
    want = logits(model)
    swapped = copy.deepcopy(model)
    n_moe = sum(1 for b in model.model.layers if hasattr(b.mlp, "experts"))
    assert swap_experts(swapped) == n_moe > 0 and swap_experts(swapped) == 0  # idempotent
    experts = swapped.model.layers[0].mlp.experts
    assert isinstance(experts, PerExpertMoE) and isinstance(experts[1].up_proj, torch.nn.Linear)
    fused = model.model.layers[0].mlp.experts
    inter = experts[1].up_proj.out_features
    assert torch.equal(experts[1].up_proj.weight, fused.gate_up_proj[1, inter:])
    assert torch.equal(experts[1].down_proj.weight, fused.down_proj[1])
    torch.testing.assert_close(logits(swapped), want, rtol=1e-5, atol=1e-5)
    experts.all_tokens = True  # every token through every expert: the output still follows the router
    torch.testing.assert_close(logits(swapped), want, rtol=1e-5, atol=1e-5)


def test_table_expands_experts_per_block():
    model = _random("Qwen2MoeForCausalLM")
    swap_experts(model)
    spec = get_arch(model)
    moe, dense = get_blocks(model, spec)
    assert spec.moe.shared_expert == "shared_expert" and ARCHITECTURES["MixtralForCausalLM"].moe.num_experts == \
        "num_local_experts"
    stages = block_stages(moe, spec)
    assert stages[-2] == [(f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj") for e in range(4)]
    assert stages[-1] == [(f"mlp.experts.{e}.down_proj",) for e in range(4)]
    names = set(block_linears(moe, spec))
    assert {"mlp.shared_expert.gate_proj", "mlp.experts.3.down_proj"} <= names and "mlp.shared_expert_gate" not in names
    assert set(block_linears(dense, spec)) >= {"mlp.gate_proj", "mlp.down_proj"}
    norm = next(m for m in block_mappings(moe, spec) if m.input == "mlp")
    assert norm.compensate == ("mlp.gate", "mlp.shared_expert_gate") and len(norm.linears) == 2 + 2 * 4
    assert [m.prev for m in block_mappings(moe, spec)][-4:] == [f"mlp.experts.{e}.up_proj" for e in range(4)]
    assert expert_of(spec, "mlp.experts.3.up_proj") == "mlp.experts.3" and expert_of(spec, "mlp.gate_proj") is None


def test_hub_names_round_trip_through_transformers(tmp_path):
    """Float tensors under the names quantkit writes load with transformers' own conversion mapping."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = _random("MixtralForCausalLM")
    want = logits(model)
    fused = dict(model.state_dict())
    swap_experts(model)
    split = from_hub_names(model, fused)  # transformers' fused 3-D experts are read as well
    assert split.keys() == model.state_dict().keys()
    assert all(torch.equal(split[k], v) for k, v in model.state_dict().items())
    sd = to_hub_names(model, {k: v.contiguous() for k, v in model.state_dict().items()})
    assert {"model.layers.1.block_sparse_moe.experts.3.w3.weight",
            "model.layers.0.block_sparse_moe.gate.weight"} <= set(sd)
    assert not any(".mlp." in k for k in sd)
    assert from_hub_names(model, sd).keys() == model.state_dict().keys()
    model.config.save_pretrained(tmp_path)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(again), want, rtol=1e-5, atol=1e-5)


def _assert_reload_matches(artifact, out, tol=1e-4):
    """quantkit.load of the checkpoint == the in-memory model computing with the dequantized weights;
    every expert Linear holds the codes chosen for that expert, and nothing is NaN or Inf."""
    q = quantkit.load(out)
    torch.testing.assert_close(logits(q), logits(artifact.model), rtol=tol, atol=tol)
    for name, qw in artifact.quantized.items():
        if ".experts." in name:
            torch.testing.assert_close(q.get_submodule(name).dequantize(), qw.dequantize(), rtol=0, atol=1e-6)
    assert all(torch.isfinite(t).all() for t in read_tensors(out).values() if t.is_floating_point())
    return q


def _coverage(out):
    return json.loads((out / "quantkit.json").read_text())["moe"]


def test_gptq_routed_starved_expert_falls_back_to_rtn(starved, text, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="quantkit.models.moe"):
        artifact, out = quantize_keep(starved, "gptq", tmp_path / "q", text)
    _assert_reload_matches(artifact, out)
    cov = _coverage(out)
    assert cov["mode"] == "routed" and cov["rtn_fallback"] == ["model.layers.0.mlp.experts.2"]
    assert cov["tokens"]["model.layers.0.mlp.experts"][2] == 0 and cov["min"] == 0
    assert cov["min_expert"] == "model.layers.0.mlp.experts.2"
    assert sum(cov["tokens"]["model.layers.1.mlp.experts"]) == 2 * 4 * 32  # top-2 of every token
    assert any("model.layers.0.mlp.experts.2 saw 0 calibration token" in r.message for r in caplog.records)
    # the starved expert holds exactly its RTN codes
    lin = artifact.model.get_submodule("model.layers.0.mlp.experts.2.up_proj")
    rtn = rtn_quantize(lin.weight.detach(), 4, 32, artifact.scheme.sym)
    assert torch.equal(artifact.quantized["model.layers.0.mlp.experts.2.up_proj"].codes, rtn.codes)
    # the hub's per-expert layout (vLLM's MoE loaders, existing GPTQ MoE checkpoints); the router stays float
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    for e in range(4):
        for w in ("w1", "w2", "w3"):
            assert {f"model.layers.1.block_sparse_moe.experts.{e}.{w}.{k}" for k in ("qweight", "qzeros", "scales",
                                                                                     "g_idx")} <= keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys and not any(".mlp." in k for k in keys)


def test_gptq_all_gives_every_expert_every_token(starved, text, tmp_path):
    artifact, out = quantize_keep(starved, "gptq", tmp_path / "q", text, moe_calibration="all")
    _assert_reload_matches(artifact, out)
    cov = _coverage(out)
    assert cov["mode"] == "all" and cov["rtn_fallback"] == [] and cov["min"] == 4 * 32
    assert all(counts == [4 * 32] * 4 for counts in cov["tokens"].values())


def test_awq_routed_starved_expert(starved, text, tmp_path):
    artifact, out = quantize_keep(starved, "awq", tmp_path / "q", text, n_grid=4)
    _assert_reload_matches(artifact, out)
    cov = _coverage(out)
    assert cov["rtn_fallback"] == ["model.layers.0.mlp.experts.2"]
    assert cov["tokens"]["model.layers.0.mlp.experts"][2] == 0
    # the norm's scale was folded into the router too: routing is unchanged, block 0 still never picks expert 2
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert {"model.layers.0.block_sparse_moe.experts.2.w1.qweight", "model.layers.0.block_sparse_moe.gate.weight",
                "model.layers.0.block_sparse_moe.experts.0.w2.scales"} <= set(fh.keys())
    q = quantkit.load(out)
    picked = []
    with torch.no_grad():
        handle = q.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _a, o: picked.append(o[2]))
        logits(q)
        handle.remove()
    assert not (picked[0] == 2).any()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_qwen3_moe_every_expert_calibrated(qwen3, text, tmp_path, method):
    opts = {"n_grid": 4} if method == "awq" else {"moe_min_tokens": 1}
    artifact, out = quantize_keep(qwen3, method, tmp_path / "q", text, **opts)
    q = _assert_reload_matches(artifact, out)
    assert isinstance(q.model.layers[1].mlp.experts, PerExpertMoE)
    cov = _coverage(out)
    assert [len(c) for c in cov["tokens"].values()] == [8, 8]
    assert all(sum(c) == 2 * 4 * 32 for c in cov["tokens"].values())
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert {"model.layers.0.mlp.experts.7.down_proj.qweight", "model.layers.0.mlp.gate.weight"} <= keys


def test_qwen2_moe_shared_expert_and_dense_block(tmp_path, text):
    folder = make_moe(tmp_path / "m", "Qwen2MoeForCausalLM")
    artifact, out = quantize_keep(folder, "gptq", tmp_path / "q", text, moe_min_tokens=1)
    _assert_reload_matches(artifact, out)
    names = set(artifact.quantized)
    assert {"model.layers.0.mlp.shared_expert.up_proj", "model.layers.0.mlp.experts.3.down_proj",
            "model.layers.1.mlp.gate_proj"} <= names  # shared expert and the dense block's MLP are quantized
    assert not any(n.endswith(("shared_expert_gate", "mlp.gate")) for n in names)  # gates stay float
    assert list(_coverage(out)["tokens"]) == ["model.layers.0.mlp.experts"]


def test_rtn_quantizes_each_expert(starved, tmp_path, text):
    artifact, out = quantize_keep(starved, "rtn", tmp_path / "q", text)
    assert sum(".experts." in n for n in artifact.quantized) == 2 * 4 * 3
    q = quantkit.load(out)
    assert type(q.model.layers[0].mlp.experts[3].down_proj).__name__ == "QuantLinear"
    assert "moe" not in json.loads((out / "quantkit.json").read_text())  # no calibration, no coverage


def test_nan_in_an_expert_is_refused(starved, tmp_path, text):
    artifact, _ = quantize_keep(starved, "rtn", tmp_path / "q", text)
    artifact.quantized["model.layers.1.mlp.experts.3.gate_proj"].scales[0, 0] = float("nan")
    (tmp_path / "bad").mkdir()
    with pytest.raises(CheckpointError, match=r"block_sparse_moe\.experts\.3\.w1\.scales holds NaN"):
        artifact.save(tmp_path / "bad")


def test_gptq_expert_stages_replay_and_single_pass(starved):
    """Replaying only `mlp.experts` for the down projections gives the codes full block forwards give;
    the non-sequential single pass covers every expert too."""
    from quantkit.calib.pipeline import run_sequential
    from quantkit.methods.gptq.algorithm import GPTQParams
    from quantkit.methods.gptq.block import block_groups, gptq_block, replay_parent
    from quantkit.models.sources import load_model, resolve

    samples = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for seq, replay in ((True, False), (True, True), (False, False)):
        model, _ = load_model(resolve(starved))
        swap_experts(model)
        spec = get_arch(model)
        block0 = get_blocks(model, spec)[0]
        groups = block_groups(block0, spec, set(block_linears(block0, spec)))
        blocks = get_blocks(model, spec)
        targets = {f"{spec.blocks}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b, spec)}
        p = GPTQParams(bits=4, group_size=32)
        results.append(run_sequential(model, spec, samples,
                                      lambda c, s=seq, r=replay: gptq_block(c, spec, targets, p, s, r),
                                      device=torch.device("cpu"), batch_size=2))
    assert [g.expert for g in groups[2:6]] == [f"mlp.experts.{e}" for e in range(4)]
    assert len({g.stage for g in groups[2:6]}) == 1 and groups[6].stage == groups[2].stage + 1
    assert replay_parent(groups[2:6], groups[6:10]) == "mlp.experts"
    assert results[0].keys() == results[1].keys() == results[2].keys() and len(results[0]) == 2 * (4 + 4 * 3)
    for k in results[0]:
        assert torch.equal(results[0][k].codes, results[1][k].codes), k
