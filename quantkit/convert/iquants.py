"""IQ4_NL / IQ4_XS (llama.cpp's non-linear 4-bit grid) and the importance-weighted legacy encoders.

IQ4_NL  18 B per 32 weights: d fp16, qs[16]; w = d * KVALUES[q] (q: 4-bit index, nibble j low /
        j+16 high, as Q4_0).
IQ4_XS 136 B per 256 weights: d fp16, scales_h u16 (2 high bits of each 6-bit sub-block scale),
        scales_l[4] (low nibbles, two per byte), qs[128] (8 sub-blocks of 32 laid out as IQ4_NL);
        w = d * (ls - 32) * KVALUES[q].
Both search the block scale as llama.cpp's quantize_row_iq4_nl_impl does with ntry = 7 (what
llama-quantize runs): 15 trial scales, the weighted least-squares best kept.

Legacy types with an imatrix (quantize_row_q4_0_impl ...): each 32-block's scale (and min) is
fitted with weights qw * sqrt(sigma2 + x**2), sigma2 the row's mean x**2. Without weights the
legacy types are the gguf package's reference quantizers, which equal llama.cpp's.
"""

from __future__ import annotations

import numpy as np

from quantkit.convert.ksearch import EPS, F, absmax_signed, fp16, importance, make_qkx, make_qx, nint, ssum

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KV = KVALUES.astype(F)


# llama.cpp's best_index_int8 takes the lower neighbour lo of x when x - lo < hi - x in float32, which for a float32 x
# holds exactly when x < (lo + hi) / 2 (tests/unit/test_iq4_lookup.py checks each midpoint and its neighbours). Every
# midpoint of KVALUES is a multiple of 1/2, so the index is a table look-up on floor(2x) (2x is exact in float32).
_CELL_LO, _CELL_HI = -256, 256                                      # floor(2x) clipped here: beyond both midpoints
_MID2 = (KVALUES[:-1].astype(np.int32) + KVALUES[1:].astype(np.int32))  # 2 * midpoints, integers
_INDEX = np.searchsorted(_MID2, np.arange(_CELL_LO, _CELL_HI + 1), side="right").astype(np.uint8)
_VALUE = _KV[_INDEX]


def _cells(v: np.ndarray) -> np.ndarray:
    """floor(2v) - _CELL_LO as table indices; NaN lands on the top cell (index 15, as llama.cpp's search gives)."""
    with np.errstate(over="ignore"):                                # 2x past float32's range: inf, still ordered
        c = np.multiply(v, F(2), dtype=F, casting="no")             # float32 only: the midpoint rule is float32's
    np.fmin(c, F(_CELL_HI), out=c)                                  # fmin/fmax take the number over NaN
    np.fmax(c, F(_CELL_LO), out=c)
    np.floor(c, out=c)
    c -= F(_CELL_LO)                                                # integers up to 512: exact
    return c.astype(np.intp)


def best_index(v: np.ndarray) -> np.ndarray:
    """Index of the nearest KVALUES entry of float32 v (llama.cpp's best_index_int8: a tie goes to the upper one)."""
    return _INDEX[_cells(v)]


def _nearest_value(v: np.ndarray) -> np.ndarray:
    """KVALUES[best_index(v)] as float32, in one look-up."""
    return _VALUE[_cells(v)]


def _nl_scales(xs: np.ndarray, w: np.ndarray, ntry: int = 7) -> np.ndarray:
    """Block scales for (32, B) sub-blocks with weights w: the best of the 2*ntry+1 trials (0 for zero blocks)."""
    mx, amax = absmax_signed(xs)
    zero = amax < EPS
    mx = np.where(zero, F(1), mx)

    def sums(idv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _nearest_value(idv * xs)
        wq = w * q
        return ssum(wq * xs), ssum(wq * q)

    with np.errstate(divide="ignore", invalid="ignore"):
        d = (-mx / _KV[0]) if ntry > 0 else (mx / _KV[0])
        sumqx, sumq2 = sums(F(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F(0)).astype(F)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums(F(itry + int(KVALUES[0])) / mx)
            upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(upd, sumqx / sumq2, d).astype(F)
            best = np.where(upd, d * sumqx, best).astype(F)
    return np.where(zero, F(0), d)


def _pack_nl(idx: np.ndarray) -> np.ndarray:
    """(..., 32) indices -> (..., 16) bytes: idx[j] | idx[j+16] << 4."""
    return (idx[..., :16] | idx[..., 16:] << 4).astype(np.uint8)


def _unpack_nl(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _weights(xs: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray) -> np.ndarray:
    return xs * xs if qw is None else importance(xs, qw, sigma2)


def encode_iq4_nl(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """x (nb, 32) float32, qw (nb, 32) or None -> (nb, 18) IQ4_NL blocks."""
    xs = np.ascontiguousarray(np.asarray(x, F).T)                # (32, nb)
    sigma2 = ssum(xs * xs) * (F(2) / F(32))
    d = _nl_scales(xs, _weights(xs, None if qw is None else np.ascontiguousarray(qw.T), sigma2))
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F(1) / np.where(d != 0, d, F(1)), F(0))
    idx = best_index(inv * xs).T
    return np.concatenate([fp16(d).astype("<f2").view(np.uint8).reshape(-1, 2), _pack_nl(idx)], axis=1)


def decode_iq4_nl(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 18)
    d = np.ascontiguousarray(b[:, :2]).view("<f2").astype(F)
    return d * _KV[_unpack_nl(b[:, 2:])]


def encode_iq4_xs(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """x (nb, 256) float32, qw (nb, 256) or None -> (nb, 136) IQ4_XS super-blocks."""
    x = np.asarray(x, F)
    nb = x.shape[0]
    sigma2 = ssum(np.ascontiguousarray(x.T) ** 2) * (F(2) / F(256))
    xs = np.ascontiguousarray(x.reshape(-1, 32).T)               # (32, nb*8)
    qs = None if qw is None else np.ascontiguousarray(qw.reshape(-1, 32).T)
    scales = _nl_scales(xs, _weights(xs, qs, np.repeat(sigma2, 8))).reshape(nb, 8)
    mx, _ = absmax_signed(np.ascontiguousarray(scales.T))
    d = (-mx / F(32)).astype(F)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F(1) / np.where(d != 0, d, F(1)), F(0)).astype(F)
        ls = np.clip(nint(inv[:, None] * scales), -32, 31)
        dl = d[:, None] * ls.astype(F)
        idl = np.where(dl != 0, F(1) / np.where(dl != 0, dl, F(1)), F(0)).astype(F)
    idx = best_index(idl[..., None] * x.reshape(nb, 8, 32))
    ls = (ls + 32).astype(np.uint16)
    scales_h = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    scales_l = ((ls[:, 0::2] & 15) | (ls[:, 1::2] & 15) << 4).astype(np.uint8)
    head = fp16(d).astype("<f2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([head, scales_h.astype("<u2").view(np.uint8).reshape(-1, 2), scales_l,
                           _pack_nl(idx).reshape(nb, 128)], axis=1)


def decode_iq4_xs(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 136)
    nb = b.shape[0]
    d = np.ascontiguousarray(b[:, :2]).view("<f2").reshape(nb).astype(F)
    sh = np.ascontiguousarray(b[:, 2:4]).view("<u2").reshape(nb, 1)
    sl = b[:, 4:8]
    low = np.stack([sl & 15, sl >> 4], axis=2).reshape(nb, 8).astype(np.int32)
    high = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.int32)
    dl = d[:, None] * ((low | high << 4) - 32).astype(F)
    q = _KV[_unpack_nl(b[:, 8:].reshape(nb, 8, 16))]
    return (dl[..., None] * q).reshape(nb, 256)


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """Mean x**2 of each row (rows, n), summed in llama.cpp's order: (rows,)."""
    return ssum(np.ascontiguousarray(x.T) ** 2) / F(x.shape[1])


def encode_legacy_weighted(x: np.ndarray, qw: np.ndarray, kind: str, row_sigma2: np.ndarray | None = None) -> np.ndarray:
    """Rows x (rows, n) in q4_0 | q4_1 | q5_0 | q5_1 with importance weights qw (n,): (rows, n/32 * block bytes).

    `row_sigma2` (rows,): the rows' mean x**2 when x is a slice of longer rows (default: x's own)."""
    rows, n = x.shape
    sigma2 = np.repeat(_row_sigma2(x) if row_sigma2 is None else np.asarray(row_sigma2, F), n // 32)
    xs = np.ascontiguousarray(x.reshape(-1, 32).T)                 # (32, rows * n/32)
    w = importance(xs, np.tile(qw.reshape(-1, 32).T, (1, rows)), sigma2)
    bits = 5 if kind.startswith("q5") else 4
    if kind.endswith("_0"):
        d, L = make_qx(xs, 1 << (bits - 1), w)
        head = [fp16(d).astype("<f2").view(np.uint8).reshape(-1, 2)]
    else:
        d, mn, L = make_qkx(xs, w, (1 << bits) - 1, -0.9, 0.05, 36, False)
        head = [fp16(d).astype("<f2").view(np.uint8).reshape(-1, 2),
                fp16(-mn).astype("<f2").view(np.uint8).reshape(-1, 2)]
    L = L.T.astype(np.uint32)                                        # (blocks, 32)
    parts = head
    if bits == 5:
        hb = (L >> 4) & 1
        qh = (hb << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
        parts.append(qh.astype("<u4").view(np.uint8).reshape(-1, 4))
    parts.append(_pack_nl(L & 15))
    return np.concatenate(parts, axis=1).reshape(rows, -1)
