"""The AutoAWQ GEMM layout: interleaved int32 packing, QuantizedWeight round trips, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantkit.errors import CheckpointError
from quantkit.formats.awq import AWQ_ORDER, AWQFormat, AWQLayout, pack_awq, unpack_awq
from quantkit.formats.qlinear import QuantLinear
from quantkit.formats.specs import FORMATS, detect_format
from quantkit.grid import rtn_quantize
from quantkit.scheme import make_scheme


def test_order_is_autoawq_interleave():
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


def test_pack_matches_hand_computed_words():
    # outputs 0..7 hold 0..7: nibble i holds output ORDER[i] -> nibbles 0,2,4,6,1,3,5,7 from bit 0 up
    assert pack_awq(torch.arange(8)[None]).tolist() == [[0x75316420]]
    # outputs hold 1..8: nibbles 1,3,5,7,2,4,6,8 -> 0x86427531, which wraps to a negative int32
    assert pack_awq(torch.arange(1, 9)[None]).tolist() == [[0x86427531 - (1 << 32)]]
    assert pack_awq(torch.full((1, 8), 15)).tolist() == [[-1]]
    # two words per row, two rows: columns 8..15 go to the second word only
    v = torch.zeros(2, 16, dtype=torch.int64)
    v[1, 9] = 3  # output 9 is output 1 of word 1 -> nibble 4 (ORDER[4] == 1)
    assert pack_awq(v).tolist() == [[0, 0], [0, 3 << 16]]


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 16, (24, 64), generator=g)
    packed = pack_awq(v)
    assert packed.dtype == torch.int32 and packed.shape == (24, 8)
    assert torch.equal(unpack_awq(packed), v.to(torch.int32))


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_awq(torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        pack_awq(torch.full((1, 8), 16))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_layout_round_trip_and_shapes(sym, group_size):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    qw = rtn_quantize(w, 4, group_size, sym, bias=torch.randn(96))
    layout = AWQLayout()
    t = layout.pack(qw)
    for name, (shape, dtype) in layout.shapes(96, 64, 4, group_size).items():
        assert tuple(t[name].shape) == shape and t[name].dtype == dtype, name
    back = layout.unpack(t, 4, group_size, sym)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.g_idx, qw.g_idx)
    torch.testing.assert_close(back.dequantize(), qw.dequantize(), rtol=0, atol=0)
    if sym:  # symmetric AWQ still stores its constant zeros
        assert unpack_awq(t["qzeros"]).unique().tolist() == [8]


def test_qweight_packs_along_output_dim():
    qw = rtn_quantize(torch.randn(16, 32), 4, 32, False)
    t = AWQLayout().pack(qw)
    # row i of qweight holds input i; word c holds outputs 8c..8c+7 in the interleaved order
    word = int(t["qweight"][5, 1]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 15 for i in range(8)]
    assert nibbles == [int(qw.codes[8 + AWQ_ORDER[i], 5]) for i in range(8)]


def test_layout_refuses_other_bits_and_act_order():
    qw = rtn_quantize(torch.randn(32, 64), 3, 32, False)
    with pytest.raises(ValueError, match="4-bit"):
        AWQLayout().pack(qw)
    qw = rtn_quantize(torch.randn(32, 64), 4, 32, False)
    qw.g_idx = torch.flip(qw.g_idx, [0])
    with pytest.raises(ValueError, match="g_idx"):
        AWQLayout().pack(qw)


def test_quantlinear_forward_uses_dequantized_weight():
    w, b = torch.randn(64, 128), torch.randn(64)
    qw = rtn_quantize(w, 4, 64, False, bias=b)
    mod = QuantLinear.from_quantized(qw, AWQLayout())
    x = torch.randn(3, 128)
    ref = F.linear(x, qw.dequantize(), b.half().float())
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)


def test_format_config_side_file_and_detection():
    fmt = FORMATS["awq"]
    scheme = make_scheme("w4g64")
    qc = fmt.quantization_config(scheme, {})
    assert qc["quant_method"] == "awq" and qc["bits"] == 4 and qc["group_size"] == 64
    assert qc["zero_point"] is True and qc["version"] == "gemm"
    assert "lm_head" in qc["modules_to_not_convert"]
    assert detect_format(qc) is fmt
    layout, read = fmt.read(qc)
    assert isinstance(layout, AWQLayout) and (read.bits, read.group_size, read.sym) == (4, 64, False)
    side = fmt.side_files(qc)["quant_config.json"]
    assert side == {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM",
                    "modules_to_not_convert": qc["modules_to_not_convert"]}
    sym = fmt.quantization_config(make_scheme("w4g64", sym=True), {})
    assert sym["zero_point"] is False and fmt.read(sym)[1].sym


def test_format_refuses_other_versions():
    with pytest.raises(CheckpointError, match="gemv"):
        AWQFormat().read({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})
    with pytest.raises(CheckpointError, match="bits"):
        AWQFormat().read({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"})
