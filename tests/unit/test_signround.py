"""SignRound: the grid maths (exactness of what is tuned vs what is stored), one block's tuning, the method."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import quantkit
from quantkit.api import quantize
from quantkit.grid import rtn_quantize
from quantkit.methods.signround.algorithm import Rounding
from quantkit.methods.signsgd import linear_decay, sign_step_
from quantkit.methods.signround.block import SignRoundParams, block_norms, tune_block
from quantkit.methods.signround.transform import fold_scales, scaled, start_scales
from quantkit.models.arch import AWQMapping
from tests.tiny import llama_config, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("signround") / "m", llama_config(hidden=64, inter=128))


def _calib(text_file):
    return {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}


@pytest.mark.parametrize("sym", [False, True])
def test_untuned_state_is_a_grid_and_finalize_matches_the_tuned_weight(sym):
    w = torch.randn(32, 128)
    r = Rounding.start(w, 4, 64, sym)
    with torch.no_grad():
        r.v.uniform_(-0.5, 0.5)
        r.alpha.uniform_(0.6, 1.0)
        r.beta.uniform_(0.6, 1.0)
    qw = r.finalize()
    assert qw.codes.max() <= 15 and qw.scales.dtype == torch.float32
    assert torch.equal(qw.scales, qw.scales.half().float())  # stored in fp16 without loss
    # the weight the tuning saw is exactly the weight the checkpoint holds
    assert torch.equal(r.fake_weight(), qw.dequantize())


def test_asymmetric_start_is_rtn():
    w = torch.randn(16, 64)
    r = Rounding.start(w, 4, 32, sym=False)
    assert torch.equal(r.finalize().dequantize(), rtn_quantize(w, 4, 32, False).dequantize())


def test_symmetric_grid_reaches_every_level():
    w = torch.linspace(-1, 0.9, 64).repeat(4, 1)
    qw = Rounding.start(w, 4, 64, sym=True).finalize()
    assert int(qw.codes.min()) == 0 and int(qw.codes.max()) == 15 and int(qw.zeros[0, 0]) == 8


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_symmetric_grid_holds_the_extreme_of_either_sign_exactly(sign):
    """The group's weight of largest magnitude maps to the lowest code whatever its sign (a negative scale when it
    is positive), so it is never clipped to 7 steps, and all 16 levels stay reachable."""
    w = (sign * torch.linspace(-0.9, 1.0, 64)).repeat(3, 1)
    r = Rounding.start(w, 4, 64, sym=True)
    qw = r.finalize()
    deq = qw.dequantize()
    assert torch.allclose(deq[:, -1], w[:, -1], rtol=1e-3)  # the extreme, exactly up to the fp16 scale
    assert int(qw.codes.min()) == 0 and int(qw.codes.max()) == 15 and int(qw.zeros[0, 0]) == 8
    assert (qw.scales < 0).all() == (sign > 0)
    assert float((deq - w).abs().max()) <= float(qw.scales.abs().max()) / 2 + 1e-6  # nothing clipped
    assert torch.equal(r.fake_weight(), deq)


def test_gradients_flow_to_every_tuned_tensor():
    r = Rounding.start(torch.randn(8, 64), 3, 32, sym=False)
    for t in r.params():
        t.requires_grad_(True)
    x = torch.randn(5, 64)
    (x @ r.fake_weight().T).pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in r.params())
    sign_step_(r.params(), 0.1)
    assert all(t.grad is None for t in r.params()) and float(r.v.detach().abs().max()) == pytest.approx(0.1)
    assert linear_decay(0.01, 0, 10) == 0.01 and linear_decay(0.01, 10, 10) == 0.0


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(64)
        self.up = nn.Linear(64, 128, bias=False)
        self.down = nn.Linear(128, 64, bias=False)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(self.norm(h))))


def _block_and_target():
    """A seeded block, 16 windows of 8 tokens, its float outputs, and its Linears' float weights."""
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(16, 8, 64)
    with torch.no_grad():
        y = block(x)
    masters = {n: m.weight.detach().clone() for n, m in (("up", block.up), ("down", block.down))}
    return block, x, y, masters


def test_tuning_lowers_the_block_error_against_rtn():
    block, x, y, masters = _block_and_target()

    def err():
        with torch.no_grad():
            return float((block(x) - y).pow(2).mean())

    for n, m in (("up", block.up), ("down", block.down)):
        m.weight.data.copy_(rtn_quantize(masters[n], 3, 32, False).dequantize())
    rtn_err = err()
    for n, m in (("up", block.up), ("down", block.down)):
        m.weight.data.copy_(masters[n])
    p = SignRoundParams(bits=3, group_size=32, iters=60, batch_size=4, tune_norms=True, norm_lr=1e-3)
    out = tune_block(block, {"up": block.up, "down": block.down}, masters, x, y, (), {}, p)
    assert set(out) == {"up", "down"}
    assert torch.equal(block.up.weight, out["up"].dequantize())  # the block computes with the stored codes
    assert err() < 0.8 * rtn_err
    assert set(block_norms(block)) == {"norm.weight"} and not block.norm.weight.requires_grad


def test_token_loss_is_each_tokens_relative_error():
    """"token": a token with a 100x larger residual (an attention sink) weighs no more than any other."""
    from quantkit.methods.signround.block import _mse

    torch.manual_seed(0)
    target = torch.randn(2, 6, 16)
    out = target + 0.1 * torch.randn(2, 6, 16)
    per_token = ((out - target).pow(2).mean(-1) / target.pow(2).mean(-1)).mean()
    assert torch.allclose(_mse(out, target, "token"), per_token)
    big_t, big_o = target.clone(), out.clone()
    big_t[:, 0] *= 100
    big_o[:, 0] = big_t[:, 0] + 100 * (out[:, 0] - target[:, 0])  # the same relative error, 100x the size
    assert torch.allclose(_mse(big_o, big_t, "token"), per_token)
    assert _mse(big_o, big_t) > 100 * _mse(out, target)  # plain MSE: that token decides the loss


def test_tuning_with_token_loss_lowers_the_block_error_against_rtn():
    block, x, y, masters = _block_and_target()
    rtn = {n: rtn_quantize(masters[n], 3, 32, False).dequantize() for n in masters}
    with torch.no_grad():
        block.up.weight.copy_(rtn["up"])
        block.down.weight.copy_(rtn["down"])
        rtn_err = float((block(x) - y).pow(2).mean())
        block.up.weight.copy_(masters["up"])
        block.down.weight.copy_(masters["down"])
    p = SignRoundParams(bits=3, group_size=32, iters=60, batch_size=4, loss="token")
    tune_block(block, {"up": block.up, "down": block.down}, masters, x, y, (), {}, p)
    with torch.no_grad():
        assert float((block(x) - y).pow(2).mean()) < 0.8 * rtn_err


def test_tuning_starts_from_the_given_state():
    """`start` (v, alpha, beta) replaces round-to-nearest: with no step taken, the codes are exactly its codes."""
    block, x, y, masters = _block_and_target()
    torch.manual_seed(1)
    start = {}
    for n, w in masters.items():
        g = w.shape[1] // 32
        start[n] = (torch.rand_like(w) - 0.5, torch.full((w.shape[0], g), 0.8), torch.full((w.shape[0], g), 0.9))
    p = SignRoundParams(bits=3, group_size=32, iters=0, batch_size=4)
    out = tune_block(block, {"up": block.up, "down": block.down}, masters, x, y, (), {}, p, start=start)
    for n, (v, a, b) in start.items():
        want = Rounding(masters[n].float(), v, a, b, 3, 32, False).finalize()
        assert torch.equal(out[n].codes, want.codes) and torch.equal(out[n].scales, want.scales)
        assert not torch.equal(want.codes, rtn_quantize(masters[n], 3, 32, False).codes)


_MAPS = [AWQMapping(prev="norm", linears=("up",), inspect="up"), AWQMapping(prev="up", linears=("down",), inspect="down")]


def test_equivalent_scales_are_exact_before_rounding():
    """Scaled masters with the divided norm (and the divided previous Linear) compute what the block computed."""
    import copy

    torch.manual_seed(0)
    block = _Block()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 8, 64)
    with torch.no_grad():
        y = block(x)
    scales = start_scales(block, _MAPS, {"up", "down"})
    assert [sc.prev for sc in scales] == ["norm", "up"]
    with torch.no_grad():
        for sc in scales:
            sc.log_s.uniform_(-1, 1)
        eff, extra = scaled(block, {"up": block.up.weight, "down": block.down.weight}, scales)
        folded = copy.deepcopy(block)
        fold_scales(folded, scales)
        assert torch.allclose(folded.norm.weight, extra["norm.weight"])
        folded.up.weight.copy_(eff["up"])
        folded.down.weight.copy_(eff["down"])
        assert torch.allclose(folded(x), y, atol=1e-5)
    assert start_scales(block, _MAPS, {"down"}) == []  # `up` is not tuned: it could not take the division


def test_tuning_with_equivalent_scales_stores_what_it_computes():
    block, x, y, masters = _block_and_target()
    import copy

    rtn_block = copy.deepcopy(block)
    with torch.no_grad():
        for n in masters:
            getattr(rtn_block, n).weight.copy_(rtn_quantize(masters[n], 3, 32, False).dequantize())
        rtn_err = float((rtn_block(x) - y).pow(2).mean())
    norm_before = block.norm.weight.detach().clone()
    p = SignRoundParams(bits=3, group_size=32, iters=60, batch_size=4, scale_lr=0.02)
    out = tune_block(block, {"up": block.up, "down": block.down}, masters, x, y, (), {}, p, _MAPS)
    assert torch.equal(block.up.weight, out["up"].dequantize()) and torch.equal(block.down.weight, out["down"].dequantize())
    assert not torch.equal(block.norm.weight, norm_before)  # the norm holds the folded division
    with torch.no_grad():
        err = float((block(x) - y).pow(2).mean())
    assert err < 0.8 * rtn_err


def test_method_checkpoint_is_deterministic_and_loads(tiny, text_file, tmp_path):
    opts = {"iters": 8, "calib_dtype": "float32"}
    for name in ("a", "b"):
        quantize(tiny, "signround", tmp_path / name, scheme={"bits": 4, "group_size": 32},
                 calib=_calib(text_file), options=opts, device="cpu")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    prov = json.loads((tmp_path / "a" / "quantkit.json").read_text())
    assert prov["method"] == "signround" and prov["options"]["iters"] == 8
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    model = quantkit.load(tmp_path / "a", kernel="reference")
    ids = torch.arange(1, 17).unsqueeze(0)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_compiled_step_is_deterministic_and_tunes_like_eager(tiny, text_file, tmp_path):
    """`compile=on` runs the same maths through torch.compile: byte-identical across runs, and the codes
    agree with the eager step's except where float rounding of the step's sums flips a sign."""
    pytest.importorskip("torch._inductor")
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler for torch.compile on CPU")
    from safetensors.torch import load_file

    kw = dict(scheme={"bits": 4, "group_size": 32}, calib=_calib(text_file), device="cpu")
    for name, comp in (("c1", "on"), ("c2", "on"), ("eager", "off")):
        quantize(tiny, "signround", tmp_path / name, options={"iters": 6, "calib_dtype": "float32", "compile": comp},
                 **kw)
    assert (tmp_path / "c1" / "model.safetensors").read_bytes() == (tmp_path / "c2" / "model.safetensors").read_bytes()
    prov = json.loads((tmp_path / "c1" / "quantkit.json").read_text())
    assert prov["options"]["compile_used"] is True
    a, b = load_file(tmp_path / "c1" / "model.safetensors"), load_file(tmp_path / "eager" / "model.safetensors")
    qweights = [k for k in a if k.endswith("qweight")]
    assert qweights
    same = sum(int(torch.equal(a[k], b[k])) for k in qweights)
    assert same >= len(qweights) // 2, f"only {same} of {len(qweights)} packed weights agree with eager"


def test_resume_gives_the_same_checkpoint(tiny, text_file, tmp_path, monkeypatch):
    """Killing after a block and running again continues from the saved float and quantized streams."""
    import quantkit.calib.pipeline as pipeline

    opts = {"iters": 4, "calib_dtype": "float32"}
    kw = dict(scheme={"bits": 4, "group_size": 32}, calib=_calib(text_file), options=opts, device="cpu")
    quantize(tiny, "signround", tmp_path / "ref", **kw)

    def boom(i):
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_test_hook_kill", boom)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny, "signround", tmp_path / "out", **kw)
    monkeypatch.undo()
    assert (tmp_path / "out.partial" / "inputs-00001.safetensors").is_file()
    quantize(tiny, "signround", tmp_path / "out", **kw)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_method_with_end_to_end_stage_is_deterministic_and_loads(tiny, text_file, tmp_path):
    opts = {"iters": 4, "calib_dtype": "float32", "e2e_steps": 3, "e2e_lr": 1e-2}
    kw = dict(scheme={"bits": 4, "group_size": 32}, calib=_calib(text_file), options=opts, device="cpu")
    for name in ("a", "b"):
        quantize(tiny, "signround", tmp_path / name, **kw)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    blockwise = tmp_path / "c"
    quantize(tiny, "signround", blockwise, **{**kw, "options": {**opts, "e2e_steps": 0}})
    from safetensors.torch import load_file

    a, c = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(blockwise / "model.safetensors"))
    assert a.keys() == c.keys()
    qweights = [k for k in a if k.endswith("qweight")]
    assert qweights and all(torch.equal(a[k], c[k]) for k in qweights)  # the codes are the block stage's
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("scales"))  # the scales moved
    model = quantkit.load(tmp_path / "a", kernel="reference")
    assert torch.isfinite(model(input_ids=torch.arange(1, 17).unsqueeze(0)).logits).all()


def test_end_to_end_stage_in_compressed_tensors_keeps_the_linears_packed(tiny, text_file, tmp_path):
    """The end-to-end stage reads the block stage back from the work folder in the output format's own layout."""
    from safetensors.torch import load_file

    opts = {"iters": 4, "calib_dtype": "float32", "e2e_steps": 2, "e2e_lr": 1e-2}
    kw = dict(scheme={"bits": 4, "group_size": 32}, calib=_calib(text_file), options=opts, device="cpu")
    quantize(tiny, "signround", tmp_path / "ct", fmt="compressed-tensors", **kw)
    quantize(tiny, "signround", tmp_path / "gptq", **kw)
    ct = load_file(str(tmp_path / "ct" / "model.safetensors"))
    packed = [k for k in ct if k.endswith("weight_packed")]
    assert packed and not any(k.endswith("proj.weight") for k in ct)
    a, b = quantkit.load(tmp_path / "ct", kernel="reference"), quantkit.load(tmp_path / "gptq", kernel="reference")
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_end_to_end_stage_refuses_disk_offload(tiny, text_file, tmp_path):
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="end-to-end"):
        quantize(tiny, "signround", tmp_path / "x", scheme={"bits": 4, "group_size": 32}, calib=_calib(text_file),
                 options={"iters": 2, "e2e_steps": 2, "offload": "disk"}, device="cpu")


def test_compile_auto_turns_on_from_eight_steps_a_block(monkeypatch):
    from quantkit.methods.base import QuantJob
    from quantkit.methods.signround import run
    from quantkit.models.sources import ModelSource
    from quantkit.scheme import make_scheme

    def job(**o):
        return QuantJob(source=ModelSource("folder", "unused", "unused"), scheme=make_scheme("w4g64"),
                        options=run.SignRoundOptions(**o))

    monkeypatch.setattr(run, "can_compile", lambda device: True)
    assert run.use_compile(job(iters=8)) and run.use_compile(job(iters=30))
    assert not run.use_compile(job(iters=7)) and not run.use_compile(job(iters=30, compile="off"))
    monkeypatch.setattr(run, "can_compile", lambda device: False)
    assert not run.use_compile(job(iters=50)) and run.use_compile(job(iters=2, compile="on"))
