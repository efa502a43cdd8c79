"""Shared packing maths of torch's int4 matmuls (CPU `_weight_int4pack_mm_for_cpu`, CUDA tinygemm).

Both ops dequantize w = (q - 8) * s + zf with q in [0, 16), per group of
`qgs` consecutive inputs (qgs in 32, 64, 128, 256), from a (K/qgs, N, 2)
tensor of (s, zf) pairs. GPTQ/AWQ integer zeros map exactly: zf = s * (8 - z).
2- and 3-bit codes are 4-bit codes that do not use the top values, so the
same ops serve them; their codes and zeros are shifted up by 8 - 2**(bits-1) so
that q - 8 stays small (the bf16 scale's rounding error is multiplied by |q - 8|).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.grid import QuantizedWeight
from quantkit.kernels.base import LayerSpec, act_order_perm, g_idx_kind, grid_zero_floats

INT4_GROUPS = (256, 128, 64, 32)  # group sizes the ops accept, largest first
INT4_MID = 8


def int4_group(group: int) -> int | None:
    """The largest op group size dividing a layer's effective group (groups split into equal op groups)."""
    return next((g for g in INT4_GROUPS if group % g == 0), None)


def int4_refusal(spec: LayerSpec, n_multiple: int) -> str | None:
    if spec.bits not in (2, 3, 4):
        return f"serves 2-, 3- and 4-bit weights, the layer has {spec.bits} bits"
    if spec.out_features % n_multiple:
        return f"needs out_features divisible by {n_multiple}, the layer has {spec.out_features}"
    if spec.in_features % 32:
        return f"needs in_features divisible by 32, the layer has {spec.in_features}"
    if int4_group(spec.effective_group) is None:
        return f"needs a group size divisible by 32, the layer has {spec.effective_group}"
    if spec.g_idx == "irregular":
        return "act-order g_idx whose groups are not runs of group_size inputs"
    return None


@dataclass
class Int4Parts:
    codes: Tensor | None   # (N, K) uint8 in [0, 16), input columns in kernel order (None: codes not unpacked)
    scales_zeros: Tensor   # (K/qgs, N, 2) float32: (s, zf) per op group
    qgs: int               # op group size
    perm: Tensor | None    # (K,) int64 input permutation (act-order), or None


def int4_parts(qw: QuantizedWeight, device: torch.device) -> Int4Parts:
    """Codes, (scale, float zero) pairs and the act-order permutation, ready for either op's packer.

    Codes left on the meta device (`fast_quantized(codes=False)`) stay unbuilt: parts.codes is None."""
    out_f, in_f = qw.shape
    gs = in_f if qw.group_size == -1 else qw.group_size
    qgs = int4_group(gs)
    assert qgs is not None, gs
    offset = INT4_MID - (1 << (qw.bits - 1))               # 0 for 4 bits, 4 for 3, 6 for 2
    codes = None if qw.codes.is_meta else qw.codes.to(device=device, dtype=torch.uint8)
    if codes is not None and offset:
        codes = codes + offset
    perm = None
    if g_idx_kind(qw.g_idx, in_f, qw.group_size) == "permutable":
        # Sorting inputs by group makes group g the g-th run of gs inputs: permute W's columns once
        # here, and the activations' columns (an index_select) on every call.
        perm = act_order_perm(qw.g_idx).to(device)
        codes = None if codes is None else codes[:, perm]
    s, zf = grid_zero_floats(qw, INT4_MID - offset)        # (N, G) each, G = K / gs; s*(8 - (z+offset))
    reps = gs // qgs                                       # op groups per checkpoint group
    s = s.repeat_interleave(reps, dim=1)
    zf = zf.repeat_interleave(reps, dim=1)                 # (N, K/qgs)
    sz = torch.stack([s.t(), zf.t()], dim=-1).to(device)   # (K/qgs, N, 2)
    return Int4Parts(None if codes is None else codes.contiguous(), sz.contiguous(), qgs, perm)


def _block_layout(codes: Tensor, rows: int) -> Tensor:
    """(N, K) uint8 -> (N, K/2): each block of `rows` output rows stored as K x rows/2 bytes,
    byte (k, j) holding row j of the block in its low nibble and row j + rows/2 in its high one."""
    n, k = codes.shape
    c = codes.reshape(n // rows, 2, rows // 2, k)               # (blocks, low/high half, rows/2, K)
    packed = c[:, 0] | (c[:, 1] << 4)                           # (blocks, rows/2, K)
    return packed.transpose(1, 2).reshape(n, k // 2).contiguous()  # (blocks, K, rows/2) -> (N, K/2)


def gptq4_int4pack(qweight: Tensor, rows: int) -> Tensor:
    """GPTQ 4-bit words (K/8, N) int32 -> the CPU int4pack block layout (N, K/2) uint8, in one pass.

    Byte t of word (r, n) holds code[n, 8r+2t] in its low nibble and code[n, 8r+2t+1] in its high one;
    the op's byte (block b, k, j) holds code[bR+j, k] low and code[bR+j+R/2, k] high (R = `rows`).
    So each output byte takes one nibble from the same-position byte of two rows R/2 apart: the nibble
    swap runs on whole int32 words (4 bytes per element), and only the final reorder moves single bytes.
    No codes tensor is built (a tenth of the memory traffic of unpacking, then packing).
    """
    r8, n = qweight.shape
    h, blocks = rows // 2, n // rows
    w = qweight.contiguous().reshape(r8, blocks, 2, h)   # (K/8, blocks, half, R/2) words
    lo, hi = w[:, :, 0], w[:, :, 1]                       # rows j and j + R/2 of each block
    m = 0x0F0F0F0F                                        # the low nibble of each byte
    even = lo & m                                         # byte t: code[.., 8r+2t] of row j (low) ...
    even |= (hi & m) << 4                                 # ... and of row j + R/2 (high)
    odd = (lo >> 4) & m                                   # byte t: code[.., 8r+2t+1], same pairing
    odd |= hi & ~m                                        # ~m = 0xF0F0F0F0: the high nibbles stay in place
    out = torch.empty(blocks, r8, 4, 2, h, dtype=torch.uint8, device=qweight.device)  # (blocks, K, R/2)
    for e, words in enumerate((even, odd)):               # (K/8, blocks, R/2, 4 bytes) -> (blocks, K/8, 4, R/2)
        out[:, :, :, e, :] = words.view(torch.uint8).reshape(r8, blocks, h, 4).permute(1, 0, 3, 2)
    return out.reshape(n, r8 * 4)


@functools.cache
def int4pack_block_rows() -> int | None:
    """Rows per block of `_convert_weight_to_int4pack_for_cpu`'s layout in this process, or None.

    The op's layout depends on the CPU build it dispatches to (torch 2.13: 32 rows on AVX2,
    64 on AVX512), so it is found once by packing a probe through the op, never assumed.
    """
    n, k = 128, 64
    probe = ((torch.arange(n * k, dtype=torch.int64) * 7 + 3) % 16).reshape(n, k)
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32).contiguous(), 2)
    for rows in (32, 64):
        if torch.equal(_block_layout(probe.to(torch.uint8), rows), want):
            return rows
    return None


def cpu_int4pack(codes: Tensor) -> Tensor:
    """(N, K) uint8 codes -> (N, K/2) uint8 in the layout of `_convert_weight_to_int4pack_for_cpu`.

    The op takes int32 codes; building its block layout directly in uint8 costs a quarter of
    the memory traffic (tests/unit/test_kernels_select.py checks it against the op). Row counts
    that are not whole blocks, and an unknown layout, go through the op itself.
    """
    n, _ = codes.shape
    rows = int4pack_block_rows()
    if rows is None or n % rows:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    return _block_layout(codes, rows)
