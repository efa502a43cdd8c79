"""One GGUF block as a fixed grid: fit it with the encoders' search, round onto it, pack codes into its bytes.

An encoder (`gguf_quant.quantize_rows`) decides a block's header (scales, mins, the K types'
6-bit sub-block scales, IQ4's block scale) and its codes together. A caller that chooses the
codes itself (error feedback that rounds one column at a time) needs them apart:

    grid = BlockCodec(qtype).fit(x, qw)    x (rows, block) float32: the header of each row's block
    idx, v = grid.round(k, column)         column k of the block onto its grid: code indices, values
    data = grid.pack(idx)                  (rows, block bytes): the header with those codes

Every type's grid is affine per weight, value = scale * LEVELS[idx] + offset (offset only for the
types with a min), computed in the decoder's float32 order, so `dequantize_rows(grid.pack(idx))`
equals the values `round` returned bit for bit, and rounding those values again gives `idx` back
wherever the scale is not zero (where it is, every code decodes the same; index 0 is written).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.convert import iquants, kquants
from quantkit.convert.gguf_quant import WEIGHTED_LEGACY, dequantize_rows, quantize_rows
from quantkit.convert.ksearch import F, nint

Q = GGMLQuantizationType
_AR = np.arange
LEVELS: dict[GGMLQuantizationType, np.ndarray] = {
    Q.Q4_0: _AR(16) - 8, Q.Q4_1: _AR(16), Q.Q5_0: _AR(32) - 16, Q.Q5_1: _AR(32), Q.Q8_0: _AR(-128, 128),
    Q.Q2_K: _AR(4), Q.Q3_K: _AR(8) - 4, Q.Q4_K: _AR(16), Q.Q5_K: _AR(32), Q.Q6_K: _AR(64) - 32,
    Q.IQ4_NL: iquants.KVALUES.astype(np.int64), Q.IQ4_XS: iquants.KVALUES.astype(np.int64),
}
GRID_TYPES = frozenset(LEVELS)
_MIN_TYPES = {Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q4_K, Q.Q5_K}


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(F)


def _per_weight(v: np.ndarray, n: int) -> np.ndarray:
    """(rows, k) per sub-block -> (rows, k * n) per weight."""
    return np.repeat(v, n, axis=1)


def grid_of(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, block bytes) one block per row -> per-weight (scale, offset or None), (rows, block) float32."""
    blk = GGML_QUANT_SIZES[qtype][0]
    one = lambda v: _per_weight(v[:, None], blk)  # noqa: E731  (rows,) -> (rows, blk)
    if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL):
        return one(_f16(data[:, :2])), None
    if qtype in (Q.Q4_1, Q.Q5_1):
        return one(_f16(data[:, :2])), one(_f16(data[:, 2:4]))
    if qtype == Q.Q2_K:
        sc, d, dmin = data[:, :16], _f16(data[:, 80:82]), _f16(data[:, 82:84])
        return (_per_weight(d[:, None] * (sc & 15).astype(F), 16),
                -_per_weight(dmin[:, None] * (sc >> 4).astype(F), 16))
    if qtype == Q.Q3_K:
        sc = kquants._unpack_scales6_signed(data[:, 96:108]).astype(F)
        return _per_weight(_f16(data[:, 108:110])[:, None] * sc, 16), None
    if qtype in (Q.Q4_K, Q.Q5_K):
        ls, lm = kquants._unpack_scale_min6(data[:, 4:16])
        d, dmin = _f16(data[:, 0:2]), _f16(data[:, 2:4])
        return _per_weight(d[:, None] * ls.astype(F), 32), -_per_weight(dmin[:, None] * lm.astype(F), 32)
    if qtype == Q.Q6_K:
        sc = data[:, 192:208].view(np.int8).astype(F)
        return _per_weight(_f16(data[:, 208:210])[:, None] * sc, 16), None
    if qtype == Q.IQ4_XS:
        rows = data.shape[0]
        sh = np.ascontiguousarray(data[:, 2:4]).view("<u2").reshape(rows, 1)
        sl = data[:, 4:8]
        low = np.stack([sl & 15, sl >> 4], axis=2).reshape(rows, 8).astype(np.int32)
        high = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.int32)
        return _per_weight(_f16(data[:, :2])[:, None] * ((low | high << 4) - 32).astype(F), 32), None
    raise ValueError(f"{qtype.name} has no block grid")


# Byte offsets of each type's float16 block scale d, and of its float16 min (dmin, or Q4_1/Q5_1's m) where it has
# one. Every decoder is linear in the two, value = d * a + m * b with a, b fixed by the codes and integer sub-scales.
_D_AT = {Q.Q4_0: 0, Q.Q4_1: 0, Q.Q5_0: 0, Q.Q5_1: 0, Q.Q8_0: 0, Q.Q2_K: 80, Q.Q3_K: 108, Q.Q4_K: 0, Q.Q5_K: 0,
         Q.Q6_K: 208, Q.IQ4_NL: 0, Q.IQ4_XS: 0}
_M_AT = {Q.Q4_1: 2, Q.Q5_1: 2, Q.Q2_K: 82, Q.Q4_K: 2, Q.Q5_K: 2}


def _blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """(rows, nb * block bytes) -> (rows, nb, block bytes), a view."""
    size = GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(data).reshape(data.shape[0], -1, size)


def header_scales(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray | None]:
    """A tensor's (rows, nb * block bytes) float16 block scales d and mins m (None for the types without), each
    (rows, nb) float32."""
    b = _blocks(data, qtype)
    f16 = lambda at: np.ascontiguousarray(b[:, :, at:at + 2]).view("<f2")[..., 0].astype(F)  # noqa: E731
    return f16(_D_AT[qtype]), (f16(_M_AT[qtype]) if qtype in _M_AT else None)


def with_header_scales(data: np.ndarray, qtype: GGMLQuantizationType, d: np.ndarray,
                       m: np.ndarray | None = None) -> np.ndarray:
    """`data` with each block's d (and m) replaced, (rows, nb) values stored as float16; the codes and integer
    sub-scales are kept."""
    out = _blocks(np.array(data, dtype=np.uint8, copy=True), qtype)
    out[:, :, _D_AT[qtype]:_D_AT[qtype] + 2] = np.asarray(d, "<f2")[..., None].view(np.uint8)
    if m is not None:
        out[:, :, _M_AT[qtype]:_M_AT[qtype] + 2] = np.asarray(m, "<f2")[..., None].view(np.uint8)
    return out.reshape(data.shape)


def affine_parts(data: np.ndarray, qtype: GGMLQuantizationType, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The per-weight parts a, b (rows, n) float32 of a tensor's values, value = d[block] * a + m[block] * b:
    the tensor decoded with every d = 1, m = 0, and with d = 0, m = 1. Exact: a and b are small integer products,
    so d * a equals the decoder's (d * sub-scale) * level bit for bit."""
    rows, nb = data.shape[0], data.shape[1] // GGML_QUANT_SIZES[qtype][1]
    one, zero = np.ones((rows, nb), F), np.zeros((rows, nb), F)
    has_m = qtype in _M_AT
    a = dequantize_rows(with_header_scales(data, qtype, one, zero if has_m else None), qtype, n)
    b = dequantize_rows(with_header_scales(data, qtype, zero, one), qtype, n) if has_m else None
    return a, b


def _nib(q: np.ndarray) -> np.ndarray:
    """(rows, 32) values in [0, 16) -> (rows, 16) bytes: q[j] | q[j+16] << 4."""
    return (q[:, :16] | q[:, 16:] << 4).astype(np.uint8)


def _qh32(idx: np.ndarray) -> np.ndarray:
    """The fifth bits of (rows, 32) codes as a little-endian u32 per row: (rows, 4) bytes."""
    bits = ((idx >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def _bitplane(mask: np.ndarray) -> np.ndarray:
    """(rows, 256) booleans -> (rows, 32): bit s of byte l is mask[32s + l] (Q3_K hmask, Q5_K qh)."""
    rows = mask.shape[0]
    return np.packbits(mask.reshape(rows, 8, 32).astype(np.uint8), axis=1, bitorder="little").reshape(rows, 32)


def pack_codes(data: np.ndarray, idx: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`data` (rows, block bytes) with its codes replaced by the level indices `idx` (rows, block)."""
    out = np.array(data, dtype=np.uint8, copy=True)
    idx = idx.astype(np.int64)
    if qtype in (Q.Q4_0, Q.IQ4_NL):
        out[:, 2:18] = _nib(idx)
    elif qtype == Q.Q4_1:
        out[:, 4:20] = _nib(idx)
    elif qtype in (Q.Q5_0, Q.Q5_1):
        at = 2 if qtype == Q.Q5_0 else 4
        out[:, at:at + 4] = _qh32(idx)
        out[:, at + 4:at + 20] = _nib(idx & 15)
    elif qtype == Q.Q8_0:
        out[:, 2:34] = (idx - 128).astype(np.int8).view(np.uint8)
    elif qtype == Q.Q2_K:
        out[:, 16:80] = kquants._pack2(idx)
    elif qtype == Q.Q3_K:
        out[:, :32] = _bitplane(idx > 3)
        out[:, 32:96] = kquants._pack2(idx & 3)
    elif qtype == Q.Q4_K:
        out[:, 16:144] = kquants._pack4(idx)
    elif qtype == Q.Q5_K:
        out[:, 16:48] = _bitplane(idx > 15)
        out[:, 48:176] = kquants._pack4(idx & 15)
    elif qtype == Q.Q6_K:
        out[:, :192] = kquants.pack_q6(idx)
    elif qtype == Q.IQ4_XS:
        out[:, 8:136] = _nib(idx.reshape(-1, 32)).reshape(-1, 128)
    else:
        raise ValueError(f"{qtype.name} has no block grid")
    return out


def nearest(t: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the level nearest to t (levels sorted; consecutive integers round half to even)."""
    lv = levels.astype(F)
    if levels[-1] - levels[0] == len(levels) - 1:
        return np.clip(nint(t) - int(levels[0]), 0, len(levels) - 1)
    mu = np.clip(np.searchsorted(lv, t, side="right"), 1, len(lv) - 1)
    return np.where((t - lv[mu - 1]) < (lv[mu] - t), mu - 1, mu)


@dataclass
class BlockGrid:
    """The fitted grids of one block of `rows` rows: its header bytes and per-weight scale/offset."""

    qtype: GGMLQuantizationType
    data: np.ndarray                  # (rows, block bytes), as the search encoded the block
    scale: np.ndarray                 # (rows, block) float32
    offset: np.ndarray | None         # (rows, block) float32, None for the symmetric types

    def values(self, k: int | slice, idx: np.ndarray) -> np.ndarray:
        """Decoded value of level index `idx` at column(s) k, in the decoder's float32 arithmetic."""
        v = self.scale[:, k] * LEVELS[self.qtype][idx].astype(F)
        return v if self.offset is None else v + self.offset[:, k]

    def round(self, k: int | slice, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Column(s) k of the block, x (rows,) or (rows, m), onto the grid: (level indices, values)."""
        s = self.scale[:, k]
        t = x if self.offset is None else x - self.offset[:, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            idx = np.where(s != 0, nearest(t / np.where(s != 0, s, F(1)), LEVELS[self.qtype]), 0)
        return idx, self.values(k, idx)

    def pack(self, idx: np.ndarray) -> np.ndarray:
        return pack_codes(self.data, idx, self.qtype)


@dataclass(frozen=True)
class BlockCodec:
    """One GGUF type's block search and grid: what error-feedback rounding needs of a format."""

    qtype: GGMLQuantizationType

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def name(self) -> str:
        return self.qtype.name

    def fit(self, x: np.ndarray, qw: np.ndarray, row_sigma2: np.ndarray | None = None) -> BlockGrid:
        """The grid the importance-weighted encoder picks for x (rows, block) with importance qw (block,).

        `row_sigma2` (rows,): the whole rows' mean x**2, which the legacy types' weighting uses."""
        x = np.ascontiguousarray(x, dtype=F)
        if self.qtype in WEIGHTED_LEGACY:
            data = iquants.encode_legacy_weighted(x, np.asarray(qw, F), WEIGHTED_LEGACY[self.qtype], row_sigma2)
        else:
            data = quantize_rows(x, self.qtype, qw)
        return BlockGrid(self.qtype, data, *grid_of(data, self.qtype))

    def scales(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A tensor's float block scales and mins (`header_scales`), what end-to-end tuning may move."""
        return header_scales(data, self.qtype)

    def parts(self, data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """value = d * a + m * b per weight (`affine_parts`)."""
        return affine_parts(data, self.qtype, n)

    def with_scales(self, data: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
        return with_header_scales(data, self.qtype, d, m)


def encode_on_grid(values: np.ndarray, data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Rows `values` (rows, n) re-encoded on the grids that `data` (rows, n / block * block bytes) holds: each
    block keeps its header and takes the codes nearest to its values. For values that `data` decodes to, this
    gives `data` back (up to the codes of zero-scale sub-blocks, which decode the same whatever they are)."""
    blk, size = GGML_QUANT_SIZES[qtype]
    out = np.empty_like(data)
    for b in range(values.shape[1] // blk):
        head = np.ascontiguousarray(data[:, b * size:(b + 1) * size])
        grid = BlockGrid(qtype, head, *grid_of(head, qtype))
        out[:, b * size:(b + 1) * size] = grid.pack(grid.round(slice(None), values[:, b * blk:(b + 1) * blk])[0])
    return out
