"""SmoothQuant calibrated in bfloat16 (the `calib_dtype` option): the statistics and passes run in bf16, but the
scales fold into the block's float32 originals exactly (what the checkpoint keeps) and the weights are rounded from
float32 masters; the run stays byte-deterministic."""

import json

import pytest
import torch

from quantkit import api
from quantkit.calib.masters import computing_in, edit_originals
from quantkit.calib.pipeline import run_sequential
from quantkit.loading import load
from quantkit.methods.scaling import fold_scale
from quantkit.methods.smoothquant import smooth as sq
from quantkit.models.arch import get_arch
from quantkit.scheme import make_scheme


def _model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def test_edit_originals_folds_in_float32_and_hands_the_block_a_bf16_copy():
    block = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    block[0].weight.data = torch.linspace(0.5, 2.0, 8)
    before = {k: t.detach().clone() for k, t in block.named_parameters()}
    s = torch.linspace(1.0, 3.0, 8)
    originals: dict = {}
    with computing_in(block, torch.bfloat16, originals) as masters:
        edit_originals(block, originals, masters, lambda b: fold_scale(b, "0", ("1",), s))
        # the block computes with the folded tensors in bf16, not shared with the float32 originals
        assert block[0].weight.dtype == torch.bfloat16 and block[1].weight.dtype == torch.bfloat16
        assert torch.equal(masters[block[1]], before["1.weight"] * s[None, :])
        assert masters[block[1]].dtype == torch.float32
        assert torch.equal(block[1].weight, (before["1.weight"] * s[None, :]).bfloat16())
        block[1].weight.data.zero_()  # a rounding step's write reaches neither the master nor the original
        assert not torch.equal(masters[block[1]], torch.zeros(4, 8))
    # the block gets back the float32 fold (exact: not a bf16 round trip)
    assert block[0].weight.dtype == torch.float32
    assert torch.equal(block[0].weight, before["0.weight"] / s)
    assert torch.equal(block[1].weight, before["1.weight"] * s[None, :])
    assert torch.equal(block[1].bias, before["1.bias"])


def test_edit_originals_without_a_compute_dtype_edits_the_block():
    block = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    w = block[1].weight.detach().clone()
    edit_originals(block, {}, {}, lambda b: fold_scale(b, "0", ("1",), torch.full((4,), 2.0)))
    assert torch.equal(block[1].weight, w * 2.0)


def test_bf16_smoothing_keeps_the_model_exact_in_float32(tiny_llama):
    """Smoothing alone (fixed alpha, no rounding) while the blocks compute in bf16: the restored float32 model
    computes what it did before, to float32 precision (a fold in bf16 would move the logits by ~1e-2)."""
    model = _model(tiny_llama)
    with torch.no_grad():  # an outlier channel, so the scales are far from 1
        model.model.layers[0].input_layernorm.weight[3] = 30.0
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    spec = get_arch(model)
    cfg = sq.SmoothConfig(alpha=0.8, grid=(), score_tokens=64)
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()

    def per_block(calib):
        assert calib.dtype == torch.bfloat16
        names = {n for n, m in calib.block.named_modules() if isinstance(m, torch.nn.Linear)}
        sq.smooth_block(calib, spec, names, make_scheme("w8a8"), cfg)
        return {}

    run_sequential(model, spec, ids, per_block, device=torch.device("cpu"), batch_size=2,
                   compute_dtype=torch.bfloat16)
    folded = model.model.layers[0].input_layernorm.weight
    assert folded.dtype == torch.float32 and not torch.equal(norm, folded)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["smoothquant", "smoothquant-rtn"])
def test_bf16_calibration_is_deterministic_and_close_to_float32(tiny_llama, text_file, tmp_path, method):
    calib = dict(dataset=str(text_file), nsamples=4, seqlen=32, batch_size=2)
    for name, dt in (("a", "bfloat16"), ("b", "bfloat16"), ("f", "float32")):
        api.quantize(str(tiny_llama), method, tmp_path / name, scheme="w8a8", options={"calib_dtype": dt},
                     calib=calib, device="cpu")
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in "ab")
    assert a == b  # same seed, same bytes
    assert json.loads((tmp_path / "a" / "quantkit.json").read_text())["options"]["calib_dtype_used"] == "bfloat16"
    assert json.loads((tmp_path / "f" / "quantkit.json").read_text())["options"]["calib_dtype_used"] == "float32"
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = _model(tiny_llama)(ids).logits
        la, lf = (load(tmp_path / n)(ids).logits for n in "af")
    assert (la - base).norm() < 1.5 * (lf - base).norm()


def test_collect_stops_each_batch_after_the_last_site(tiny_llama):
    """The statistics pass stops a batch once every mapping's input is recorded: down_proj (after the last site,
    its own input) never runs, and the maxima are those of the whole block's inputs."""
    model = _model(tiny_llama)
    spec = get_arch(model)
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    got = {}

    def per_block(calib):
        names = {n for n, m in calib.block.named_modules() if isinstance(m, torch.nn.Linear)}
        mappings = sq.usable_mappings(calib.block, spec, names)
        ran, full = [], {}
        h = calib.block.mlp.down_proj.register_forward_hook(lambda *_: ran.append(1))
        sites = sq.collect(calib, mappings, 64, 0)
        h.remove()
        assert ran == [] and set(sites) == {"self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"}

        def grab(name):
            def pre(_m, args):
                x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0)
                full[name] = torch.maximum(full[name], x) if name in full else x
            return pre

        hs = [calib.block.get_submodule(n).register_forward_pre_hook(grab(n)) for n in sites]
        calib.forward()
        for h in hs:
            h.remove()
        got[calib.index] = all(torch.equal(sites[n].amax, full[n]) for n in sites)
        assert sum(len(r) for r in sites["mlp.down_proj"].sample) > 0
        return {}

    run_sequential(model, spec, ids, per_block, device=torch.device("cpu"), batch_size=2)
    assert got == {0: True, 1: True}
