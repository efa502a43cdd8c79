"""The end-to-end stage's maths (`quantkit.methods.e2e.tune`): the chunked KL and its gradient, the tuning of scales,
norms and (optionally) rounding against a float teacher, on a tiny model quantized by RTN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantkit.grid import rtn_quantize
from tests.tiny import llama_config, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("e2e-tune") / "m", llama_config(hidden=64, inter=128))


def _rtn_model_and_base(tiny):
    """(base, model, its RTN w3g32 codes, calibration samples, KL(base || model) on them)."""
    from transformers import AutoModelForCausalLM

    from quantkit.methods.e2e.tune import _kl_sum

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    quantized = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:
            quantized[name] = rtn_quantize(mod.weight, 3, 32, False)
            mod.weight.data.copy_(quantized[name].dequantize())
    samples = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))

    def kl():
        with torch.no_grad():
            t, q = base(input_ids=samples).logits, model(input_ids=samples).logits
            return float(_kl_sum(t.flatten(0, 1), q.flatten(0, 1))) / t.shape[0] / t.shape[1]

    return base, model, quantized, samples, kl


@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_kl_is_the_full_kl_and_its_gradient(cap):
    """Logits a chunk at a time, the gradient computed in the forward pass, give the full-vocabulary KL and the
    gradient autograd gives, with and without Gemma's logit soft-cap."""
    from quantkit.methods.e2e.tune import Head, _kl_sum, chunked_kl

    torch.manual_seed(0)
    wt, ws = torch.randn(50, 16), torch.randn(50, 16)
    head_t, head_s = Head(wt, None, cap), Head(ws, None, cap)
    ht, hs = torch.randn(2, 7, 16), torch.randn(2, 7, 16, requires_grad=True)

    def logits(w, h):
        z = h @ w.t()
        return torch.tanh(z / cap) * cap if cap else z

    full = _kl_sum(logits(wt, ht).flatten(0, 1), logits(ws, hs).flatten(0, 1)) / 14
    (g_full,) = torch.autograd.grad(full, hs)
    chunked = chunked_kl(ht, hs, head_t, head_s, chunk=3)  # 14 tokens: chunks of 3, 3, 3, 3, 2
    (g_chunk,) = torch.autograd.grad(2 * chunked, hs)  # the upstream gradient is applied
    assert torch.allclose(chunked, full, atol=1e-6) and torch.allclose(g_chunk, 2 * g_full, atol=1e-6)


def test_end_to_end_tuning_lowers_kl_and_keeps_codes(tiny):
    from quantkit.methods.e2e.tune import E2EParams, tune_end_to_end

    base, model, quantized, samples, kl = _rtn_model_and_base(tiny)
    before = kl()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = tune_end_to_end(model, base, quantized, samples, E2EParams(steps=30, batch_size=4, lr=1e-2, norm_lr=1e-2))
    assert kl() < before
    for name, qw in out.items():
        assert torch.equal(qw.codes, quantized[name].codes) and torch.equal(qw.zeros, quantized[name].zeros)
        assert torch.equal(qw.scales, qw.scales.half().float())
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_end_to_end_from_a_prebuilt_teacher_equals_the_float_model(tiny):
    """The teacher's hidden states, computed once (the float model then freed), give the same tuning as the float
    model run every step; two passes over the windows (batch 4 x 4 steps on 8 windows) run it once a window."""
    import copy

    from quantkit.methods.e2e.tune import E2EParams, teacher_of, tune_end_to_end

    base, model, quantized, samples, _ = _rtn_model_and_base(tiny)
    twin = copy.deepcopy(model)
    p = E2EParams(steps=4, batch_size=4, lr=1e-2, norm_lr=1e-2)
    calls = []
    hook = base.model.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        teacher = teacher_of(base, twin, samples, p)
    finally:
        hook.remove()
    assert teacher.hidden.shape[:2] == samples.shape and teacher.same_head
    assert len(calls) == -(-samples.shape[0] // p.batch_size)
    a = tune_end_to_end(model, base, quantized, samples, p)
    b = tune_end_to_end(twin, teacher, quantized, samples, p)
    for name in a:
        assert torch.equal(a[name].scales, b[name].scales)
    for (n, x), (_, y) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(x, y), n


def test_end_to_end_in_bf16_with_compiled_kl_lowers_kl_and_keeps_codes(tiny):
    """The fast path (weights built grouped in the autocast dtype, head weight cast once, compiled KL) tunes."""
    from quantkit.methods.e2e.tune import E2EParams, tune_end_to_end

    base, model, quantized, samples, kl = _rtn_model_and_base(tiny)
    before = kl()
    p = E2EParams(steps=30, batch_size=4, lr=1e-2, norm_lr=1e-2, autocast=torch.bfloat16, compile=True)
    out = tune_end_to_end(model, base, quantized, samples, p)
    assert kl() < 0.9 * before
    for name, qw in out.items():
        assert torch.equal(qw.codes, quantized[name].codes) and torch.equal(qw.zeros, quantized[name].zeros)
        assert torch.equal(qw.scales, qw.scales.half().float())
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())


def test_end_to_end_head_holds_its_weight_in_the_autocast_dtype(tiny):
    from transformers import AutoModelForCausalLM

    from quantkit.methods.e2e.tune import _head

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    h = torch.randn(5, model.config.hidden_size)
    w = model.get_output_embeddings().weight
    assert torch.equal(_head(model)(h), h @ w.t())
    z = _head(model, torch.bfloat16)(h)
    assert z.dtype == torch.bfloat16 and torch.equal(z, h.bfloat16() @ w.bfloat16().t())
    model.config.final_logit_softcapping = 2.0
    assert float(_head(model)(h).abs().max()) < 2.0


def test_end_to_end_rounding_starts_from_the_block_codes_and_lowers_kl(tiny):
    from quantkit.methods.e2e.tune import E2EParams, tune_end_to_end

    base, model, quantized, samples, kl = _rtn_model_and_base(tiny)
    before = kl()
    # A vanishing step keeps every code: the tuned code starts exactly at the block stage's.
    still = tune_end_to_end(model, base, quantized, samples,
                            E2EParams(steps=1, batch_size=4, lr=1e-12, norm_lr=1e-12, rounding_lr=1e-12))
    for name, qw in still.items():
        assert torch.equal(qw.codes, quantized[name].codes)
    out = tune_end_to_end(model, base, quantized, samples,
                          E2EParams(steps=30, batch_size=4, lr=1e-2, norm_lr=1e-2, rounding_lr=0.05))
    assert kl() < before
    changed = sum(int((qw.codes != quantized[n].codes).sum()) for n, qw in out.items())
    assert changed > 0
    for name, qw in out.items():
        assert int(qw.codes.max()) <= 7 and torch.equal(qw.zeros, quantized[name].zeros)
        assert torch.equal(qw.scales, qw.scales.half().float())
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())


@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_kl_gives_the_head_weight_gradient(cap):
    """With the student head's weight passed as a parameter, the chunked KL's gradient in it is autograd's on the
    full logits (soft-capped or not), and the hidden states' gradient is unchanged."""
    from quantkit.methods.e2e.tune import Head, _kl_sum, chunked_kl

    torch.manual_seed(1)
    wt = torch.randn(40, 8)
    ws = torch.randn(40, 8, requires_grad=True)
    ht, hs = torch.randn(3, 5, 8), torch.randn(3, 5, 8, requires_grad=True)

    def logits(w, h):
        z = h @ w.t()
        return torch.tanh(z / cap) * cap if cap else z

    full = _kl_sum(logits(wt, ht).flatten(0, 1), logits(ws, hs).flatten(0, 1)) / 15
    g_h, g_w = torch.autograd.grad(full, (hs, ws))
    chunked = chunked_kl(ht, hs, Head(wt, None, cap), Head(ws.detach(), None, cap), chunk=4, head_weight=ws)
    c_h, c_w = torch.autograd.grad(3 * chunked, (hs, ws))
    assert torch.allclose(c_h, 3 * g_h, atol=1e-6) and torch.allclose(c_w, 3 * g_w, atol=1e-5)


def test_end_to_end_embedding_lever_tunes_the_tied_embedding_and_lowers_kl_further(tiny):
    """`embedding_lr` > 0 moves the (tied) embedding, keeps it tied, keeps the codes, and ends below the same run
    without it; off, the embedding is the float model's, bit for bit."""
    from quantkit.methods.e2e.tune import E2EParams, tune_end_to_end

    base, model, quantized, samples, kl = _rtn_model_and_base(tiny)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tune_end_to_end(model, base, quantized, samples, E2EParams(steps=30, batch_size=4, lr=1e-2, norm_lr=1e-2))
    without = kl()
    assert torch.equal(model.get_input_embeddings().weight, emb0)

    base, model, quantized, samples, kl = _rtn_model_and_base(tiny)
    out = tune_end_to_end(model, base, quantized, samples,
                          E2EParams(steps=30, batch_size=4, lr=1e-2, norm_lr=1e-2, embedding_lr=1e-3))
    emb = model.get_input_embeddings().weight
    assert not torch.equal(emb, emb0) and emb is model.get_output_embeddings().weight
    assert kl() < without
    for name, qw in out.items():
        assert torch.equal(qw.codes, quantized[name].codes)
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_relative_norms_move_each_gain_by_its_own_size(tiny, shift):
    """`norms="relative"`: Adam on log-gains, gain = g0 exp(t), the gain read off the module (x * w, or Gemma's
    x * (1 + w), here emulated by a shifted forward); a tiny weight moves by about its own size, not by the step."""
    from quantkit.methods.e2e.tune import E2EParams, norm_params, tune_end_to_end

    base, model, quantized, samples, kl = _rtn_model_and_base(tiny)
    norms = norm_params(model)
    if shift:  # a Gemma-style norm: the module computes with 1 + w, its weight stored as w
        for n, w in norms.items():
            mod = model.get_submodule(n.rsplit(".", 1)[0])
            mod.forward = (lambda m: lambda x: m.__class__.forward(m, x) + x / x.pow(2).mean(-1, keepdim=True).add(
                m.variance_epsilon).sqrt())(mod)
    name = next(iter(norms))
    with torch.no_grad():
        norms[name][0] = 1e-5 - shift          # one tiny gain (1e-5), as SmolLM2's outlier channels have
    gains0 = {n: w.detach().clone() + shift for n, w in norms.items()}
    before = kl()
    tune_end_to_end(model, base, quantized, samples,
                    E2EParams(steps=30, batch_size=4, lr=1e-2, norm_lr=1e-2, norms="relative"))
    assert kl() < before
    ratio = {n: (w.detach() + shift) / gains0[n] for n, w in norms.items()}
    assert all(float((r - 1).abs().max()) < 0.35 for r in ratio.values())    # 30 steps of 1e-2: |t| <= 0.3
    assert abs(float(ratio[name][0]) - 1) < 0.35 and float((ratio[name] - 1).abs().max()) > 1e-3
    assert all(not w.requires_grad or w.grad is None for w in norms.values())


def test_norms_off_leave_the_norms(tiny):
    from quantkit.methods.e2e.tune import E2EParams, norm_params, tune_end_to_end

    base, model, quantized, samples, kl = _rtn_model_and_base(tiny)
    norms = {n: w.detach().clone() for n, w in norm_params(model).items()}
    before = kl()
    tune_end_to_end(model, base, quantized, samples, E2EParams(steps=10, batch_size=4, lr=1e-2, norms="off"))
    assert kl() < before
    assert all(torch.equal(w, norms[n]) for n, w in norm_params(model).items())


def test_positions_pick_the_same_tokens_of_both_models_in_order():
    """`token_fraction` < 1 keeps that share of the positions, the same ones for teacher and student, in order and
    seeded; at 1 it keeps them all and draws nothing (the batch order that follows is unchanged)."""
    from quantkit.methods.e2e.tune import _positions

    t = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    s = t + 1000
    gen = torch.Generator().manual_seed(0)
    th, sh = _positions(t, s, 0.25, gen)
    assert th.shape == (5, 3) and torch.equal(sh, th + 1000)
    rows = (th[:, 0] / 3).long()
    assert torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == 5
    again, _ = _positions(t, s, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(again, th)
    state = gen.get_state()
    th1, sh1 = _positions(t, s, 1.0, gen)
    assert torch.equal(th1, t.reshape(-1, 3)) and torch.equal(sh1, s.reshape(-1, 3))
    assert torch.equal(gen.get_state(), state)
    assert _positions(t, s, 1e-6, gen)[0].shape == (1, 3)  # at least one


def test_end_to_end_on_a_share_of_the_positions_lowers_kl_and_repeats(tiny):
    """Tuning on a quarter of each step's positions still lowers the KL over all of them, and the same seed gives
    the same scales."""
    from quantkit.methods.e2e.tune import E2EParams, tune_end_to_end

    outs = []
    for _ in range(2):
        base, model, quantized, samples, kl = _rtn_model_and_base(tiny)
        before = kl()
        p = E2EParams(steps=30, batch_size=4, lr=1e-2, norm_lr=1e-2, token_fraction=0.25)
        outs.append(tune_end_to_end(model, base, quantized, samples, p))
        assert kl() < before
    assert all(torch.equal(outs[0][n].scales, outs[1][n].scales) for n in outs[0])
