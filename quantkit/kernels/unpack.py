"""Vectorized unpacking of a reference QuantLinear's checkpoint tensors, for packing kernels at load time.

`QuantLinear.quantized()` goes through the layouts' general bit-stream unpacker
(int64, one pass per code slot, any bit width), which costs seconds per 7B-sized
layer. For the layouts whose codes never straddle words (GPTQ at 2/4/8 bits,
AWQ) one broadcast shift does the same work; the result is identical
(tests/unit/test_kernels_select.py checks it), anything else uses `quantized()`.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from quantkit.formats.awq import AWQ_ORDER, AWQLayout
from quantkit.formats.layouts import GPTQLayout
from quantkit.formats.packing import unpack_fields
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import QuantizedWeight, trivial_g_idx

_AWQ_INVERSE = [AWQ_ORDER.index(p) for p in range(len(AWQ_ORDER))]  # output p of 8 sits in nibble _AWQ_INVERSE[p]


def _fields(words: Tensor, bits: int) -> Tensor:
    """(..., W) int32 words -> (..., W * 32/bits) uint8 fields, lowest bits first (bits in 2, 4, 8)."""
    return unpack_fields(words, bits).reshape(*words.shape[:-1], -1)


def unpack_gptq_rows_t(qweight: Tensor, bits: int) -> Tensor:
    """(K*bits/32, N) int32 -> (N, K) uint8 codes (packed along the input dim; returned transposed)."""
    r, n = qweight.shape
    per = 32 // bits
    if bits == 8 and sys.byteorder == "little":
        # a word's bytes in memory are its fields, lowest first: the transposed words *are* the codes
        # (one blocked int32 transpose instead of a byte gather: 1.0 -> 0.2 s on a 1B model's Linears)
        return qweight.t().contiguous().view(torch.uint8)
    f = _fields(qweight, bits).reshape(r, n, per)                 # word (r, n) holds inputs r*per .. r*per+per-1
    return f.permute(1, 0, 2).reshape(n, r * per)


def unpack_gptq_cols(qzeros: Tensor, bits: int) -> Tensor:
    """(G, N*bits/32) int32 -> (G, N) uint8 (packed along the output dim)."""
    g, w = qzeros.shape
    return _fields(qzeros, bits).reshape(g, w * 32 // bits)


def unpack_awq(words: Tensor) -> Tensor:
    """(R, N/8) int32 in AutoAWQ's interleaved nibble order -> (R, N) uint8."""
    r, w = words.shape
    return _fields(words, 4).reshape(r, w, 8)[:, :, _AWQ_INVERSE].reshape(r, w * 8)


def fast_codes(mod: QuantLinear) -> Tensor:
    """(out, in) uint8 codes of a reference QuantLinear, vectorized where the layout allows."""
    layout, bits = mod.layout, mod.bits
    if isinstance(layout, GPTQLayout) and 32 % bits == 0:
        return unpack_gptq_rows_t(mod.qweight, bits)
    if isinstance(layout, AWQLayout):
        return unpack_awq(mod.qweight).to(torch.uint8).t().contiguous()
    return mod.quantized().codes


def fast_quantized(mod: QuantLinear, codes: bool = True) -> QuantizedWeight:
    """Same result as `mod.quantized()`, without the general unpacker where a layout allows.

    codes=False leaves the codes on the meta device (right shape and dtype, no data): kernel
    selection needs only the grid, and a kernel may pack the checkpoint's words directly.
    """
    layout, bits = mod.layout, mod.bits
    if isinstance(layout, GPTQLayout) and 32 % bits == 0:
        zeros = unpack_gptq_cols(mod.qzeros, bits) + layout.zero_offset        # (G, out)
        g_idx = mod.g_idx.to(torch.int32)
    elif isinstance(layout, AWQLayout):
        zeros = unpack_awq(mod.qzeros)                                         # (G, out)
        g_idx = trivial_g_idx(mod.in_features, mod.group_size).to(mod.qzeros.device)
    else:
        return mod.quantized()
    shape = (mod.out_features, mod.in_features)
    c = fast_codes(mod) if codes else torch.empty(shape, dtype=torch.uint8, device="meta")
    return QuantizedWeight(
        codes=c,
        scales=mod.scales.float().t().contiguous(),
        zeros=zeros.t().to(torch.uint8).contiguous(),
        g_idx=g_idx,
        bits=bits,
        group_size=mod.group_size,
        sym=mod.sym,
        bias=None if mod.bias is None else mod.bias.float(),
    )
