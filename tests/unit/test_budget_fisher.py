"""The Fisher sensitivity of `--target-bpw --target-sensitivity fisher`: each Linear's output-gradient second
moments under labels drawn from the model itself, hooks and gradient flags left as found, and the allocation
recording which sensitivity chose it."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from quantkit.api import quantize
from quantkit.budget.fisher import output_fisher
from quantkit.budget.sensitivity import weighted_error
from quantkit.calib.fisher import sampled_labels
from quantkit.grid import quantize_weight
from quantkit.scheme import ModuleGrid


def _model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_output_fisher_equals_the_gradients_squared_mean_and_leaves_the_model_as_found(tiny_llama):
    model = _model(tiny_llama)
    lins = _linears(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = output_fisher(model, lins, ids, seed=7)
    assert set(fisher) == set(lins)
    assert all(v.shape == (lins[n].out_features,) and v.dtype == torch.float64 and bool((v >= 0).all())
               and float(v.sum()) > 0 for n, v in fisher.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in lins.values())  # no hook outlives the pass
    # the same quantity by hand: the gradient in one Linear's output, window by window, same labels
    name = "model.layers.1.mlp.down_proj"
    gen, acc = torch.Generator().manual_seed(7), torch.zeros(lins[name].out_features, dtype=torch.float64)
    for i in range(3):
        out = {}

        def keep(_m, _a, y, out=out):  # returns None: the output flows on unchanged
            y.retain_grad()
            out["y"] = y

        h = lins[name].register_forward_hook(keep)
        try:
            x = model.get_input_embeddings()(ids[i:i + 1]).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits
            labels = sampled_labels(logits, gen)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").backward()
        finally:
            h.remove()
        acc += out["y"].grad.reshape(-1, out["y"].shape[-1]).double().pow(2).sum(0)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(fisher[name], acc / ids.numel(), rtol=1e-4, atol=0)
    again = output_fisher(model, lins, ids, seed=7)
    assert all(torch.equal(again[n], fisher[n]) for n in fisher)  # deterministic under a seed
    other = output_fisher(model, lins, ids, seed=8)
    assert any(not torch.equal(other[n], fisher[n]) for n in fisher)  # the labels are drawn, not the text's


def test_weighted_error_weighs_rows_by_the_output_cost():
    torch.manual_seed(0)
    w, ms = torch.randn(8, 64), torch.rand(64)
    grid = ModuleGrid(bits=4, group_size=32)
    err = (w - quantize_weight(w, 4, 32, False).dequantize()).pow(2)
    ow = torch.zeros(8)
    ow[2] = 3.0  # only row 2's outputs reach the loss
    expect = float(3.0 * (err[2] * ms).sum())
    assert weighted_error(w, ms, grid, False, ow) == pytest.approx(expect, rel=1e-6)
    assert weighted_error(w, ms, grid, False, torch.ones(8)) == pytest.approx(weighted_error(w, ms, grid, False))


def test_target_bpw_with_fisher_sensitivity_meets_the_budget_and_records_it(tiny_llama, text_file, tmp_path):
    calib = {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}
    runs = {}
    for sens in ("hessian", "fisher"):
        s = quantize(tiny_llama, "gptq", tmp_path / sens, scheme={"bits": 4, "group_size": 64}, calib=calib,
                     device="cpu", target_bpw=6.0, target_sensitivity=sens)
        runs[sens] = s["allocation"]
        assert s["allocation"]["sensitivity"] == sens and s["allocation"]["bits_per_weight"] <= 6.0
    assert runs["fisher"]["weighted_error"] != runs["hessian"]["weighted_error"]  # weighed differently


def test_target_bpw_on_a_rotated_model_weighs_the_rotated_weights(tiny_llama, text_file, tmp_path):
    calib = {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}
    runs = {}
    for rot in (None, "hadamard"):
        scheme = {"bits": 4, "group_size": 32, **({"rotation": rot} if rot else {})}
        s = quantize(tiny_llama, "gptq", tmp_path / f"r{rot}", scheme=scheme, calib=calib, device="cpu",
                     target_bpw=5.0, target_grids="w3g32,w4g32,w8g32", target_sensitivity="fisher")
        runs[rot] = s["allocation"]
        assert s["allocation"]["bits_per_weight"] <= 5.0
    assert runs[None]["weighted_error"] != runs["hadamard"]["weighted_error"]  # other weights, other errors


def test_target_bpw_with_the_end_to_end_stage_keeps_each_linears_grid(tiny_llama, text_file, tmp_path):
    import quantkit

    calib = {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}
    out = tmp_path / "e2e"
    s = quantize(tiny_llama, "gptq", out, scheme={"bits": 4, "group_size": 32}, calib=calib, device="cpu",
                 target_bpw=5.0, target_grids="w3g32,w4g32,w8,w8g32", target_sensitivity="fisher",
                 options={"e2e_steps": 2, "calib_dtype": "float32"})
    model = quantkit.load(out, kernel="reference")
    grids = {n: (m.bits, m.group_size) for n, m in model.named_modules() if hasattr(m, "quantized")}
    assert len(set(grids.values())) > 1 and s["allocation"]["bits_per_weight"] <= 5.0
    assert torch.isfinite(model(input_ids=torch.arange(1, 17).unsqueeze(0)).logits).all()
