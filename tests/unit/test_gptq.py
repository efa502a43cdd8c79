"""The GPTQ algorithm on synthetic weights and activations (no model)."""

from __future__ import annotations

import logging

import pytest
import torch

from quantkit.grid import fit_grid, rtn_quantize
from quantkit.methods.gptq.algorithm import (GPTQParams, HessianAccumulator, gptq_quantize, group_aware_order, inverse_cholesky,
                                   split_rows)


def _data(out_f=64, in_f=128, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven scales, so H is far from diagonal and act-order matters
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(n, in_f, generator=g) @ (torch.eye(in_f) + mix) * torch.linspace(0.2, 3.0, in_f)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    acc = HessianAccumulator(in_f, "cpu")
    for chunk in x.split(500):
        acc.add(chunk)
    return w, x, acc.hessian()


def _out_err(w, wq, x):
    return float(((x @ (w - wq).t()) ** 2).mean())


def _reference_gptq(w, h, bits, gs, sym, damp):
    """The paper's algorithm, column by column with full (not lazy) updates: the slow oracle."""
    w = w.clone().double()
    h = h.clone().double()
    n = h.shape[0]
    h += damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for j in range(n):
        if j % gs == 0:
            s, z = fit_grid(w[:, j:j + gs].float(), bits, sym)
            s, z = s.double().squeeze(-1), z.double().squeeze(-1)
        c = torch.clamp(torch.round(w[:, j] / s) + z, 0, (1 << bits) - 1)
        q[:, j] = s * (c - z)
        e = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
    return q.float()


def test_hessian_accumulator_matches_definition():
    x = torch.randn(3, 50, 16)
    acc = HessianAccumulator(16, "cpu")
    for b in x:
        acc.add(b)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(acc.hessian(), 2 * flat.t() @ flat / flat.shape[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,tile", [(16, 4), (50, 8), (48, 24), (40, 256)])
def test_hessian_upper_tiles_give_the_full_symmetric_product(n, tile):
    x = torch.randn(3, 70, n, dtype=torch.bfloat16)  # bf16 activations, as under --calib-dtype bfloat16
    acc = HessianAccumulator(n, "cpu", tile=tile)
    assert len(acc.bounds) - 1 == (-(-n // tile) if n >= 2 * tile else 1)
    for b in x:
        acc.add(b)
    h = acc.hessian()
    flat = x.reshape(-1, n).double()
    assert torch.equal(h, h.t())  # mirrored exactly, not merely close
    torch.testing.assert_close(h.double(), 2 * flat.t() @ flat / flat.shape[0], rtol=1e-5, atol=1e-5)


def test_blocked_lazy_updates_match_the_unblocked_reference():
    w, _, h = _data()
    ref = _reference_gptq(w, h, 4, 32, False, 0.01)
    for bs in (16, 128):
        got = gptq_quantize(w, h, GPTQParams(bits=4, group_size=32, block_size=bs)).weight.dequantize()
        # codes may differ on rounding ties after float reassociation: nearly all must agree
        assert float((got - ref).abs().gt(1e-5).float().mean()) < 0.01


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_rtn_on_output_error(bits, sym):
    w, x, h = _data()
    res = gptq_quantize(w, h, GPTQParams(bits=bits, group_size=64, sym=sym))
    qw = res.weight
    assert not res.fallback and res.loss >= 0
    assert int(qw.codes.max()) <= (1 << bits) - 1
    if not sym:
        assert int(qw.zeros.min()) >= 1  # GPTQ v1 stores zero - 1
    rtn = rtn_quantize(w, bits, 64, sym).dequantize()
    assert _out_err(w, qw.dequantize(), x) < _out_err(w, rtn, x)


def test_per_channel_group():
    w, x, h = _data()
    qw = gptq_quantize(w, h, GPTQParams(bits=4, group_size=-1)).weight
    assert qw.scales.shape == (64, 1) and int(qw.g_idx.max()) == 0
    assert _out_err(w, qw.dequantize(), x) < _out_err(w, rtn_quantize(w, 4, -1, False).dequantize(), x)


def test_act_order_writes_g_idx_and_helps():
    w, x, h = _data()
    plain = gptq_quantize(w, h, GPTQParams(bits=3, group_size=32)).weight
    act = gptq_quantize(w, h, GPTQParams(bits=3, group_size=32, desc_act=True)).weight
    assert not act.trivial_g_idx
    # every group holds exactly group_size columns
    assert torch.bincount(act.g_idx.long()).tolist() == [32] * 4
    assert _out_err(w, act.dequantize(), x) < _out_err(w, plain.dequantize(), x)


def test_group_aware_order_keeps_groups_whole_and_sorted():
    diag = torch.tensor([1., 5, 2, 2, 9, 0, 3, 1, 4, 4, 4, 6])  # 3 groups of 4: maxima 5, 9, 6
    perm = group_aware_order(diag, 4)
    assert perm.tolist() == [4, 6, 7, 5, 11, 8, 9, 10, 1, 2, 3, 0]  # ties keep natural order
    w, _, h = _data()
    perm = group_aware_order(h.diagonal(), 32)
    assert sorted(perm.tolist()) == list(range(128))
    blocks = perm.reshape(4, 32)
    assert all(len(set((b // 32).tolist())) == 1 for b in blocks)       # each block is one whole group
    d = h.diagonal()[perm].reshape(4, 32)
    assert bool((d[:, :-1] >= d[:, 1:]).all())                           # descending inside a group
    assert bool((d[:-1, 0] >= d[1:, 0]).all())                           # groups by their maximum


def test_group_aware_is_gptq_on_the_reordered_problem():
    """GAR = the paper's algorithm on W[:, perm], H[perm][:, perm], codes put back: trivial g_idx."""
    w, x, h = _data()
    perm = group_aware_order(h.diagonal(), 32)
    ref = _reference_gptq(w[:, perm], h[perm][:, perm], 3, 32, False, 0.01)[:, torch.argsort(perm)]
    gar = gptq_quantize(w, h, GPTQParams(bits=3, group_size=32, group_aware=True)).weight
    assert gar.trivial_g_idx and gar.scales.shape == (64, 4)
    assert float((gar.dequantize() - ref).abs().gt(1e-5).float().mean()) < 0.01
    plain = gptq_quantize(w, h, GPTQParams(bits=3, group_size=32)).weight
    assert _out_err(w, gar.dequantize(), x) < _out_err(w, plain.dequantize(), x)
    # desc_act takes precedence; per-channel grids have no groups to reorder
    both = gptq_quantize(w, h, GPTQParams(bits=3, group_size=32, desc_act=True, group_aware=True)).weight
    act = gptq_quantize(w, h, GPTQParams(bits=3, group_size=32, desc_act=True)).weight
    assert torch.equal(both.codes, act.codes) and torch.equal(both.g_idx, act.g_idx)
    pc = gptq_quantize(w, h, GPTQParams(bits=3, group_size=-1, group_aware=True)).weight
    assert torch.equal(pc.codes, gptq_quantize(w, h, GPTQParams(bits=3, group_size=-1)).weight.codes)


def test_static_groups_keep_trivial_g_idx():
    w, x, h = _data()
    st = gptq_quantize(w, h, GPTQParams(bits=3, group_size=32, desc_act=True, static_groups=True)).weight
    assert st.trivial_g_idx
    # static grids are the RTN grids of the original weight
    torch.testing.assert_close(st.scales, rtn_quantize(w, 3, 32, False).scales)
    assert _out_err(w, st.dequantize(), x) < _out_err(w, rtn_quantize(w, 3, 32, False).dequantize(), x)


def test_dead_columns_become_zero():
    w, x, _ = _data()
    x[:, 5] = 0
    x[:, 77] = 0
    h = 2 * x.t() @ x / x.shape[0]
    qw = gptq_quantize(w, h, GPTQParams(bits=4, group_size=32)).weight
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert float(deq[:, 5].abs().max()) == 0 and float(deq[:, 77].abs().max()) == 0


def test_stacked_rows_equal_separate_calls():
    w, _, h = _data(out_f=96)
    p = GPTQParams(bits=4, group_size=64)
    stacked = split_rows(gptq_quantize(w, h, p).weight, [64, 32], [None, torch.ones(32)])
    alone = [gptq_quantize(w[:64], h, p).weight, gptq_quantize(w[64:], h, p).weight]
    for a, b in zip(stacked, alone):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert stacked[1].bias is not None and stacked[0].bias is None


def test_cholesky_retry_then_rtn_fallback(caplog):
    w, _, h = _data()
    # a slightly indefinite H: the first damp fails, a larger one succeeds
    bad = h - 0.05 * h.diagonal().mean() * torch.eye(h.shape[0])
    upper, damp = inverse_cholesky(bad, 0.01)
    assert upper is not None and damp > 0.01
    # a negative-definite H never factors: RTN with a warning
    with caplog.at_level(logging.WARNING, logger="quantkit.methods.gptq.algorithm"):
        res = gptq_quantize(w, -torch.eye(h.shape[0]), GPTQParams(bits=4, group_size=32))
    assert res.fallback and "RTN" in caplog.text
    assert torch.equal(res.weight.codes, rtn_quantize(w, 4, 32, False).codes)


def test_inputs_are_not_modified_and_result_is_deterministic():
    w, _, h = _data()
    w0, h0 = w.clone(), h.clone()
    a = gptq_quantize(w, h, GPTQParams(bits=4, group_size=32, desc_act=True)).weight
    b = gptq_quantize(w, h, GPTQParams(bits=4, group_size=32, desc_act=True)).weight
    assert torch.equal(w, w0) and torch.equal(h, h0)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.g_idx, b.g_idx)


def test_hessian_low_precision_products():
    """16-bit tile products summed in float32: close to the float32 Hessian; float32 inputs are unaffected."""
    torch.manual_seed(2)
    x = (torch.randn(3, 200, 600) * torch.rand(600) * 4).to(torch.bfloat16)
    ref, low = HessianAccumulator(600, "cpu"), HessianAccumulator(600, "cpu", tile=128, low_precision_products=True)
    for b in x:
        ref.add(b)
        low.add(b)
    h_ref, h_low = ref.hessian(), low.hessian()
    assert h_low.dtype == torch.float32 and torch.equal(h_low, h_low.t())
    rel = float((h_low - h_ref).norm() / h_ref.norm())
    assert 0 < rel < 3e-3
    f32 = HessianAccumulator(600, "cpu", low_precision_products=True)
    for b in x:
        f32.add(b.float())
    assert torch.equal(f32.hessian(), h_ref)


def test_hessian_absmax_only_when_tracked():
    x = torch.tensor([[1.0, -7.5], [2.0, 3.0]])
    acc = HessianAccumulator(2, "cpu")
    acc.add(x)
    assert acc.absmax is None
    tracked = HessianAccumulator(2, "cpu", track_absmax=True)
    tracked.add(x)
    assert float(tracked.absmax) == 7.5
