"""Vectorized unpacking of a reference QuantLinear's checkpoint tensors, for packing kernels at load time.

`QuantLinear.quantized()` goes through the layouts' general bit-stream unpacker
(int64, one pass per code slot, any bit width), which costs seconds per 7B-sized
layer. For the layouts whose codes never straddle words (GPTQ at 2/4/8 bits,
AWQ) one broadcast shift does the same work; the result is identical
(tests/unit/test_kernels_select.py checks it), anything else uses `quantized()`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.formats.awq import AWQ_ORDER, AWQLayout
from quantkit.formats.layouts import GPTQLayout
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import QuantizedWeight, trivial_g_idx

_AWQ_INVERSE = [AWQ_ORDER.index(p) for p in range(len(AWQ_ORDER))]  # output p of 8 sits in nibble _AWQ_INVERSE[p]


def _fields(words: Tensor, bits: int) -> Tensor:
    """(..., W) int32 words -> (..., W, 32/bits) int32 fields, lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift: the mask drops sign bits


def unpack_gptq_rows_t(qweight: Tensor, bits: int) -> Tensor:
    """(K*bits/32, N) int32 -> (N, K) int32 codes (packed along the input dim; returned transposed)."""
    r, n = qweight.shape
    return _fields(qweight.t().contiguous(), bits).reshape(n, r * 32 // bits)


def unpack_gptq_cols(qzeros: Tensor, bits: int) -> Tensor:
    """(G, N*bits/32) int32 -> (G, N) int32 (packed along the output dim)."""
    g, w = qzeros.shape
    return _fields(qzeros, bits).reshape(g, w * 32 // bits)


def unpack_awq(words: Tensor) -> Tensor:
    """(R, N/8) int32 in AutoAWQ's interleaved nibble order -> (R, N) int32."""
    r, w = words.shape
    return _fields(words, 4)[:, :, _AWQ_INVERSE].reshape(r, w * 8)


def fast_quantized(mod: QuantLinear) -> QuantizedWeight:
    """Same result as `mod.quantized()`, without the general unpacker where a layout allows."""
    layout, bits = mod.layout, mod.bits
    if isinstance(layout, GPTQLayout) and 32 % bits == 0:
        codes = unpack_gptq_rows_t(mod.qweight, bits).to(torch.uint8)         # (out, in)
        zeros = unpack_gptq_cols(mod.qzeros, bits) + layout.zero_offset        # (G, out)
        g_idx = mod.g_idx.to(torch.int32)
    elif isinstance(layout, AWQLayout):
        codes = unpack_awq(mod.qweight).to(torch.uint8).t().contiguous()      # (out, in)
        zeros = unpack_awq(mod.qzeros)                                         # (G, out)
        g_idx = trivial_g_idx(mod.in_features, mod.group_size).to(codes.device)
    else:
        return mod.quantized()
    return QuantizedWeight(
        codes=codes,
        scales=mod.scales.float().t().contiguous(),
        zeros=zeros.t().to(torch.uint8).contiguous(),
        g_idx=g_idx,
        bits=bits,
        group_size=mod.group_size,
        sym=mod.sym,
        bias=None if mod.bias is None else mod.bias.float(),
    )
