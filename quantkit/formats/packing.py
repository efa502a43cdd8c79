"""Bit packing of integer codes into int32 words, as the GPTQ format defines it.

`bits` consecutive int32 words hold 32 codes as one little-endian bit stream:
code j occupies bits [j*bits, (j+1)*bits) of the stream. For 2, 4 and 8 bits
this is the plain "32/bits codes per word, lowest first" layout; for 3 bits it
is AutoGPTQ's 3-word layout where codes 10 and 21 straddle word boundaries.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_BYTEWISE = (2, 4, 8)  # widths whose codes never straddle a byte: packed and unpacked byte by byte


def check_range(codes: Tensor, bits: int) -> None:
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")


def _bytes_to_words(b: Tensor) -> Tensor:
    """(..., 4) uint8, lowest byte first -> (...) int32 (the words' little-endian bytes)."""
    assert sys.byteorder == "little"
    return b.contiguous().reshape(-1).view(torch.int32).reshape(b.shape[:-1])  # flat: size-1 dims keep odd strides


_WIDE = {2: torch.int32, 4: torch.int16}  # an integer of 8/bits bytes: one field per byte


def pack_fields(v: Tensor, bits: int) -> Tensor:
    """(..., 4 * 8/bits) codes in [0, 2**bits), lowest first -> (...) int32 words (bits in 2, 4, 8).

    Byte t of a word holds codes t*per .. t*per+per-1 (per = 8/bits codes a byte), the lowest in
    its lowest bits: the same bit stream as the general packer. The codes of one byte are read as
    one wider integer (one code per byte) and their fields shifted together, so every operation
    runs on contiguous data (interleaving bytes through strided slices is 100x slower).
    """
    lead = v.shape[:-1]
    if bits == 8:
        return _bytes_to_words(v.to(torch.uint8).reshape(*lead, 4))
    per, mask = 8 // bits, (1 << bits) - 1
    x = v.to(torch.uint8).contiguous().reshape(-1).view(_WIDE[bits]).reshape(*lead, 4)
    y = x & mask
    for j in range(1, per):
        y |= (x >> (8 * j - j * bits)) & (mask << (j * bits))  # field j: byte j -> bits j*bits
    return _bytes_to_words(y.to(torch.uint8))


def unpack_fields(words: Tensor, bits: int) -> Tensor:
    """(...) int32 -> (..., 32/bits) uint8 codes, lowest first; inverse of `pack_fields`."""
    assert sys.byteorder == "little"
    b = words.contiguous().reshape(-1).view(torch.uint8).reshape(*words.shape, 4)
    if bits == 8:
        return b
    per, mask = 8 // bits, (1 << bits) - 1
    x = b.to(_WIDE[bits])
    y = x & mask
    for j in range(1, per):
        y |= (x & (mask << (j * bits))) << (8 * j - j * bits)  # field j: bits j*bits -> byte j
    return y.reshape(-1).view(torch.uint8).reshape(*words.shape, 32 // bits)


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
    check_range(codes, bits)
    if bits in _BYTEWISE:
        per_word = 32 // bits
        v = codes.reshape(n // per_word, per_word, m).transpose(1, 2)   # (words, M, codes of a word)
        return pack_fields(v, bits)
    v = codes.to(torch.int64).reshape(n // 32, 32, m)
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
    if bits in _BYTEWISE:
        f = unpack_fields(packed, bits)                                   # (rows, M, codes of a word)
        return f.transpose(1, 2).reshape(rows * 32 // bits, m).to(torch.int32)
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
