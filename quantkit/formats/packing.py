"""Bit packing of integer codes into int32 words, as the GPTQ format defines it.

`bits` consecutive int32 words hold 32 codes as one little-endian bit stream:
code j occupies bits [j*bits, (j+1)*bits) of the stream. For 2, 4 and 8 bits
this is the plain "32/bits codes per word, lowest first" layout; for 3 bits it
is AutoGPTQ's 3-word layout where codes 10 and 21 straddle word boundaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _plan(bits: int):
    """For each of the 32 codes: (word, shift, spill) where spill>0 means bits continue in word+1."""
    plan = []
    for j in range(32):
        off = j * bits
        word, shift = divmod(off, 32)
        plan.append((word, shift, max(0, shift + bits - 32)))
    return plan


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """(N, M) integer codes -> (N*bits/32, M) int32, packing along dim 0."""
    n, m = codes.shape
    if n % 32:
        raise ValueError(f"cannot pack {n} rows: need a multiple of 32")
    v = codes.to(torch.int64).reshape(n // 32, 32, m)
    if int(v.min()) < 0 or int(v.max()) >= (1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    words = torch.zeros(n // 32, bits, m, dtype=torch.int64, device=codes.device)
    for j, (w, s, spill) in enumerate(_plan(bits)):
        words[:, w] |= (v[:, j] << s) & _MASK32
        if spill:
            words[:, w + 1] |= v[:, j] >> (bits - spill)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.reshape(n // 32 * bits, m).to(torch.int32)


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """(N*bits/32, M) int32 -> (N, M) int32 codes; inverse of `pack_rows`."""
    rows, m = packed.shape
    if rows % bits:
        raise ValueError(f"{rows} packed rows is not a multiple of {bits} bits")
    words = packed.to(torch.int64).reshape(rows // bits, bits, m) & _MASK32
    maxq = (1 << bits) - 1
    out = torch.empty(rows // bits, 32, m, dtype=torch.int64, device=packed.device)
    for j, (w, s, spill) in enumerate(_plan(bits)):
        val = words[:, w] >> s
        if spill:
            val = val | (words[:, w + 1] << (bits - spill))
        out[:, j] = val & maxq
    return out.reshape(rows // bits * 32, m).to(torch.int32)


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """(M, N) -> (M, N*bits/32): packing along dim 1 (GPTQ qzeros)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: Tensor, bits: int) -> Tensor:
    return unpack_rows(packed.t(), bits).t().contiguous()
