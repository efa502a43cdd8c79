"""The symmetric integer grid below 8 bits gives the scale the sign of the group's extreme (llama.cpp's Q4_0:
d = max / -8), so the extreme lands exactly on the lowest code and all 2^bits levels are used."""

import pytest
import torch

from quantkit.grid import fake_quantize, fit_grid, quantize_codes, rtn_quantize
from quantkit.methods.gptq.algorithm import GPTQParams, gptq_quantize
from quantkit.methods.signround.algorithm import Rounding


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_extreme_of_either_sign_lands_on_the_lowest_code(bits, sign):
    half = 1 << (bits - 1)
    w = (sign * torch.linspace(-(half - 1) / half, 1.0, 64)).reshape(1, 64)  # the other end: 2^(b-1) - 1 steps
    scale, zero = fit_grid(w, bits, sym=True)
    assert int(zero) == half
    assert (float(scale) < 0) == (sign > 0)
    codes = quantize_codes(w, scale, zero, bits)
    assert float(codes[0, -1]) == 0.0  # the extreme: -2^(b-1) steps
    assert int(codes.max()) == 2 * half - 1  # and the other end of the range is used too
    deq = fake_quantize(w, scale, zero, bits)
    assert torch.allclose(deq[0, -1], w[0, -1], rtol=1e-3)
    assert float((deq - w).abs().max()) <= abs(float(scale)) / 2 + 1e-6  # nothing clipped


def test_the_step_is_finer_than_the_positive_scale_grid():
    w = torch.randn(32, 64)
    scale, _ = fit_grid(w, 4, sym=True)
    old = (2 * w.abs().amax(-1, keepdim=True) / 15).half().float()
    assert torch.all(scale.abs() <= old)


def test_eight_bits_keep_a_positive_scale_and_empty_groups_stay_finite():
    w = torch.randn(8, 64)
    scale, zero = fit_grid(w, 8, sym=True)
    assert (scale > 0).all() and (zero == 128).all()
    s0, z0 = fit_grid(torch.zeros(2, 64), 4, sym=True)
    assert (s0 > 0).all() and torch.equal(quantize_codes(torch.zeros(2, 64), s0, z0, 4), z0.expand(2, 64))


def test_rtn_and_the_signround_start_share_the_symmetric_grid():
    w = torch.randn(16, 128)
    assert torch.equal(rtn_quantize(w, 4, 64, True).dequantize(), Rounding.start(w, 4, 64, True).finalize().dequantize())


def test_gptq_symmetric_output_dequantizes_with_negative_scales():
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    x = torch.randn(512, 128)
    qw = gptq_quantize(w, x.t() @ x, GPTQParams(bits=4, group_size=64, sym=True))
    q = qw.weight
    assert (q.scales < 0).any() and (q.scales > 0).any()
    assert int(q.codes.min()) == 0 and int(q.codes.max()) == 15
    err = ((q.dequantize() - w) @ x.t()).pow(2).mean()
    rtn = ((rtn_quantize(w, 4, 64, True).dequantize() - w) @ x.t()).pow(2).mean()
    assert err < rtn
