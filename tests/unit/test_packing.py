import numpy as np
import pytest
import torch

from quantkit.formats.layouts import GPTQLayout
from quantkit.formats.packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from quantkit.grid import QuantizedWeight, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (96, 40), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits), codes.int())
    assert torch.equal(unpack_cols(pack_cols(codes.t(), bits), bits), codes.t().int())


def test_extreme_codes_round_trip():
    for bits in (2, 3, 4, 8):
        codes = torch.full((32, 3), (1 << bits) - 1)
        assert torch.equal(unpack_rows(pack_rows(codes, bits), bits), codes.int())


def _autogptq_pack_reference(iw: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's documented packing loop (uint32 arithmetic), for one column of 32*k codes."""
    rows = iw.shape[0] // 32 * bits
    q = np.zeros((rows,) + iw.shape[1:], dtype=np.uint32)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: codes 10 and 21 straddle the word boundaries
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i))
            i += 10
            q[row] |= iw[i] << 30
            row += 1
            q[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            q[row] |= iw[i] << 31
            row += 1
            q[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                q[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_autogptq_layout(bits):
    rng = np.random.default_rng(bits)
    iw = rng.integers(0, 1 << bits, size=(64, 5)).astype(np.uint32)
    ours = pack_rows(torch.from_numpy(iw.astype(np.int64)), bits).numpy().view(np.uint32)
    assert np.array_equal(ours, _autogptq_pack_reference(iw, bits))


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_rows(torch.full((32, 1), 16), 4)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, -1), (4, 32), (8, 64)])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_layout_round_trip(bits, group, sym):
    w = torch.randn(64, 128)
    qw = rtn_quantize(w, bits, group, sym)
    layout = GPTQLayout(version=1)
    tensors = layout.pack(qw)
    shapes = layout.shapes(64, 128, bits, group)
    for name, t in tensors.items():
        assert tuple(t.shape) == shapes[name][0] and t.dtype == shapes[name][1], name
    back = layout.unpack(tensors, bits, group, sym)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_gptq_v1_zero_convention():
    """v1 stores zero-1: a symmetric 4-bit zero of 8 is the famous 0x77777777 word."""
    qw = rtn_quantize(torch.randn(32, 64), 4, 32, sym=True)
    qzeros = GPTQLayout(version=1).pack(qw)["qzeros"]
    assert (qzeros.view(torch.int32) == 0x77777777).all()
    assert (GPTQLayout(version=2).pack(qw)["qzeros"] == -0x77777778).all()  # 0x88888888 as int32


@pytest.mark.parametrize("seed", range(8))
def test_rtn_codes_and_dequantization(seed):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
    qw = rtn_quantize(w, 4, 32, sym=False)
    assert qw.codes.max() <= 15 and qw.zeros.min() >= 1
    assert torch.equal(qw.scales, qw.scales.half().float())  # scales live on the fp16 grid
    err = (qw.dequantize() - w).abs()
    step = qw.scales.repeat_interleave(32, dim=1)
    # half a step, plus the range lost at the grid's ends when the scale rounds down to fp16
    # (15 steps, each short by at most 2**-11 of a step)
    assert (err <= step * (0.5 + 15 * 2**-11) + 1e-6).all()


def test_quantized_weight_checks_shapes():
    with pytest.raises(AssertionError):
        QuantizedWeight(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1), torch.ones(3, 1, dtype=torch.uint8),
                        torch.zeros(8, dtype=torch.int32), 4, -1, False)


@pytest.mark.parametrize("group_size,permuted,sdtype", [(32, False, torch.float32), (-1, False, torch.float32),
                                                         (32, True, torch.float32), (64, False, torch.float16)])
def test_dequantize_equals_the_gathered_formula_bit_for_bit(group_size, permuted, sdtype):
    from quantkit.grid import QuantizedWeight, trivial_g_idx

    g = torch.Generator().manual_seed(0)
    out_f, in_f = 48, 128
    n_groups = 1 if group_size == -1 else in_f // group_size
    g_idx = trivial_g_idx(in_f, group_size)
    if permuted:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    qw = QuantizedWeight(codes=torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8),
                         scales=torch.rand(out_f, n_groups, generator=g).to(sdtype),
                         zeros=torch.randint(0, 16, (out_f, n_groups), generator=g, dtype=torch.uint8),
                         g_idx=g_idx, bits=4, group_size=group_size, sym=False)
    s = qw.scales[:, g_idx.long()]
    want = (s * (qw.codes.to(s.dtype) - qw.zeros[:, g_idx.long()].to(s.dtype))).float()
    assert torch.equal(qw.dequantize(torch.float32), want)
