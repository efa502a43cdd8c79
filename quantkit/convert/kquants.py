"""llama.cpp's K-quant block types (Q2_K..Q6_K): encoders and decoders, vectorised over super-blocks.

A super-block is 256 consecutive weights of a row. Byte layouts (ggml-common.h), per super-block:
    Q2_K  84 B: scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2-bit), d fp16, dmin fp16
    Q3_K 110 B: hmask[32] (3rd bit), qs[64] (2-bit), scales[12] (16 x 6-bit signed), d fp16
    Q4_K 144 B: d fp16, dmin fp16, scales[12] (8 x 6-bit scale, 8 x 6-bit min), qs[128] (4-bit)
    Q5_K 176 B: d, dmin, scales[12], qh[32] (5th bit), qs[128]
    Q6_K 210 B: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d fp16
Sub-blocks are 16 weights (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K).

Every encoder takes x (nb, 256) float32 and optional importance weights qw (nb, 256)
(llama.cpp's quant_weights: the imatrix, broadcast over rows); without qw it is llama.cpp's
reference quantizer (quantize_row_*_ref), with qw its imatrix quantizer (quantize_row_*_impl).
Returns (nb, block bytes) uint8. The decoders invert the layout: (nb, bytes) -> (nb, 256) float32.
"""

from __future__ import annotations

import numpy as np

from quantkit.convert.ksearch import (F, importance, make_q3, make_qkx, make_qp, make_qx, nint, qkx2_weights,
                                      ssum, fp16)

QK = 256


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(nb,) float -> (nb, 2) little-endian fp16 bytes."""
    return np.asarray(v, F).astype("<f2").view(np.uint8).reshape(-1, 2)


def _f16_read(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(F)


def _sub(x: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) -> (n, nb * 256/n): sub-blocks of n weights as columns (column = block * k + sub-block)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _unsub(a: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of _sub for a per-weight array: (n, nb*k) -> (nb, 256)."""
    return np.ascontiguousarray(a.T).reshape(nb, QK)


def _pack2(L: np.ndarray) -> np.ndarray:
    """(nb, 256) values in [0, 4) -> (nb, 64): byte 32c+l holds L[128c + l + 32s] at bits 2s."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _unpack2(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32)
    return ((q >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, QK)


def _pack4(L: np.ndarray) -> np.ndarray:
    """(nb, 256) values in [0, 16) -> (nb, 128): byte 32c+l holds L[64c+l] (low), L[64c+32+l] (high)."""
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)


def _unpack4(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 15, q >> 4], axis=2).reshape(-1, QK)


def _pack_scale_min6(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins (nb, 8) -> the 12-byte K_SCALE_SIZE field (get_scale_min_k4)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | (ls[:, 4:] >> 4) << 6
    out[:, 4:8] = lm[:, :4] | (lm[:, 4:] >> 4) << 6
    out[:, 8:12] = (ls[:, 4:] & 15) | (lm[:, 4:] & 15) << 4
    return out


def _unpack_scale_min6(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ls = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | (s[:, 0:4] >> 6) << 4], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | (s[:, 4:8] >> 6) << 4], axis=1)
    return ls, lm


def _requant(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Codes against the stored sub-block scale d (nb, k) and min dm: clamp(round((x + dm)/d)); d == 0 keeps L."""
    nb, k = d.shape
    xs = x.reshape(nb, k, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(nint((xs + dm[..., None]) / np.where(d != 0, d, F(1))[..., None]), lo, hi)
    return np.where((d != 0)[..., None], new, L.reshape(nb, k, -1)).reshape(nb, QK)


def _scale_min_search(x: np.ndarray, qw: np.ndarray | None, n: int, nmax: int, ref: tuple[float, float, int, bool]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Sub-block (scale, min, codes) for the asymmetric K types; with qw also the sub-block weight sums."""
    nb = x.shape[0]
    xs = _sub(x, n)
    if qw is None:
        w = np.abs(xs) if ref[3] else qkx2_weights(xs)
        sc, mn, L = make_qkx(xs, w, nmax, *ref)
        sw = None
    else:
        sumx2 = ssum(np.ascontiguousarray(x.T) ** 2)
        sigma2 = sumx2 / F(QK) if n == 16 else F(2) * sumx2 / F(QK)   # Q2_K: mean x**2; Q4_K/Q5_K: twice it
        w = importance(xs, _sub(qw, n), np.repeat(sigma2, QK // n))
        sc, mn, L = make_qkx(xs, w, nmax, -0.9, 0.05, 36, False)
        sw = ssum(w).reshape(nb, QK // n)
    return sc.reshape(nb, -1), mn.reshape(nb, -1), _unsub(L, nb), sw


def _ref_scales(v: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference K encoders: sub-block values quantized against max/levels. Returns (codes (nb, k), fp16 step)."""
    vmax = np.maximum(v.max(axis=1), F(0))
    with np.errstate(divide="ignore"):
        inv = np.where(vmax > 0, F(levels) / vmax, F(0)).astype(F)
    return np.minimum(nint(inv[:, None] * v) & 255, levels), fp16(vmax / F(levels))


def _qp_scales(v: np.ndarray, sw: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    d, L = make_qp(np.ascontiguousarray(v.T), levels, np.ascontiguousarray(sw.T))
    return np.minimum(L.T, levels), fp16(d)


def encode_q2_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    x = np.asarray(x, F)
    sc, mn, L, sw = _scale_min_search(x, qw, 16, 3, (-0.5, 0.1, 15, True))
    if qw is None:
        ls, d = _ref_scales(sc, 15)
        lm, dmin = _ref_scales(mn, 15)
    else:
        ls, d = _qp_scales(sc, sw, 15)
        lm, dmin = _qp_scales(mn, sw, 15)
    L = _requant(x, L, d[:, None] * ls.astype(F), dmin[:, None] * lm.astype(F), 0, 3)
    scales = (ls | lm << 4).astype(np.uint8)
    return np.concatenate([scales, _pack2(L), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def decode_q2_k(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 84)
    d, dmin = _f16_read(b[:, 80:82]), _f16_read(b[:, 82:84])
    sc = b[:, :16]
    q = _unpack2(b[:, 16:80]).reshape(-1, 16, 16).astype(F)
    dl = (d[:, None] * (sc & 15).astype(F))[..., None]
    ml = (dmin[:, None] * (sc >> 4).astype(F))[..., None]
    return (dl * q - ml).reshape(-1, QK)


def _pack_scales6_signed(ls: np.ndarray) -> np.ndarray:
    """16 six-bit values (nb, 16) in [0, 64) -> Q3_K's 12 bytes: low nibbles in 0..7, high 2 bits in 8..11."""
    ls = ls.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, :8] = (ls[:, :8] & 15) | (ls[:, 8:] & 15) << 4
    hi = (ls >> 4).reshape(-1, 4, 4)                      # [j // 4, j % 4]
    out[:, 8:] = hi[:, 0] | hi[:, 1] << 2 | hi[:, 2] << 4 | hi[:, 3] << 6
    return out


def _unpack_scales6_signed(s: np.ndarray) -> np.ndarray:
    low = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1)
    hi = ((s[:, None, 8:] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3).reshape(-1, 16)
    return (low | hi << 4).astype(np.int32) - 32


def encode_q3_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    x = np.asarray(x, F)
    nb = x.shape[0]
    xs = _sub(x, 16)
    if qw is None:
        sc, L = make_q3(xs, 4)
        sc = sc.reshape(nb, 16)
        idx = np.argmax(np.abs(sc), axis=1)
        mx = sc[np.arange(nb), idx]
        nz = mx != 0
        with np.errstate(divide="ignore"):
            iscale = np.where(nz, F(-32) / np.where(nz, mx, F(1)), F(0)).astype(F)
        ls = np.where(nz[:, None], np.clip(nint(iscale[:, None] * sc), -32, 31) + 32, 0)
        with np.errstate(divide="ignore"):
            d = fp16(np.where(nz, F(1) / np.where(nz, iscale, F(1)), F(0)))
        packed = np.where(nz[:, None], _pack_scales6_signed(ls), 0).astype(np.uint8)
    else:
        sigma2 = F(2) * ssum(np.ascontiguousarray(x.T) ** 2) / F(QK)
        w = importance(xs, _sub(qw, 16), np.repeat(sigma2, 16))
        sc, L = make_qx(xs, 4, w)
        dblk, ls = make_qx(np.ascontiguousarray(sc.reshape(nb, 16).T), 32, np.ascontiguousarray(ssum(w).reshape(nb, 16).T))
        packed = _pack_scales6_signed(ls.T)
        d = fp16(dblk)
    dsub = d[:, None] * _unpack_scales6_signed(packed).astype(F)
    L = _requant(x, _unsub(L, nb), dsub, np.zeros_like(dsub), -4, 3)
    L = np.where((dsub != 0).repeat(16, axis=1), L + 4, L)   # requantized codes are signed; kept ones already +4
    hmask = np.packbits((L > 3).reshape(nb, 8, 32).astype(np.uint8), axis=1, bitorder="little").reshape(nb, 32)
    return np.concatenate([hmask, _pack2(L & 3), packed, _f16_bytes(d)], axis=1)


def decode_q3_k(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 110)
    d = _f16_read(b[:, 108:110])
    sc = _unpack_scales6_signed(b[:, 96:108]).astype(F)
    high = np.unpackbits(b[:, :32].reshape(-1, 1, 32), axis=1, count=8, bitorder="little").reshape(-1, QK)
    q = _unpack2(b[:, 32:96]).astype(np.int32) - 4 * (1 - high.astype(np.int32))
    return ((d[:, None] * sc)[..., None] * q.reshape(-1, 16, 16).astype(F)).reshape(-1, QK)


def _encode_q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int, ref: tuple[float, float, int, bool]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    sc, mn, L, sw = _scale_min_search(x, qw, 32, nmax, ref)
    if qw is None:
        ls, d = _ref_scales(sc, 63)
        lm, dmin = _ref_scales(mn, 63)
    else:
        ls, d = _qp_scales(sc, sw, 63)
        lm, dmin = _qp_scales(mn, sw, 63)
    L = _requant(x, L, d[:, None] * ls.astype(F), dmin[:, None] * lm.astype(F), 0, nmax)
    head = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min6(ls, lm)], axis=1)
    return head, L, d, dmin


def encode_q4_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    head, L, _, _ = _encode_q45_k(np.asarray(x, F), qw, 15, (-1.0, 0.1, 20, False))
    return np.concatenate([head, _pack4(L)], axis=1)


def encode_q5_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    head, L, _, _ = _encode_q45_k(np.asarray(x, F), qw, 31, (-0.5, 0.1, 15, False))
    hb = (L >> 4).reshape(-1, 8, 32).astype(np.uint8)             # bit s of qh[l]: L[32s + l] > 15
    qh = np.packbits(hb, axis=1, bitorder="little").reshape(-1, 32)
    return np.concatenate([head, qh, _pack4(L & 15)], axis=1)


def _decode_q45(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    d, dmin = _f16_read(b[:, 0:2]), _f16_read(b[:, 2:4])
    ls, lm = _unpack_scale_min6(b[:, 4:16])
    dl = (d[:, None] * ls.astype(F))[..., None]
    ml = (dmin[:, None] * lm.astype(F))[..., None]
    return (dl * q.reshape(-1, 8, 32).astype(F) - ml).reshape(-1, QK)


def decode_q4_k(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 144)
    return _decode_q45(b, _unpack4(b[:, 16:144]))


def decode_q5_k(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 176)
    high = np.unpackbits(b[:, 16:48].reshape(-1, 1, 32), axis=1, count=8, bitorder="little").reshape(-1, QK)
    return _decode_q45(b, _unpack4(b[:, 48:176]) | high << 4)


def encode_q6_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    x = np.asarray(x, F)
    nb = x.shape[0]
    sc, L = make_qx(_sub(x, 16), 32, None if qw is None else _sub(qw, 16))
    sc = sc.reshape(nb, 16)
    idx = np.argmax(np.abs(sc), axis=1)
    mx = sc[np.arange(nb), idx]
    zero = np.abs(mx) < F(1e-15)
    with np.errstate(divide="ignore"):
        iscale = (F(-128) / np.where(zero, F(1), mx)).astype(F)
        d = fp16(F(1) / iscale)
    ls = np.minimum(127, nint(iscale[:, None] * sc)).astype(np.int8)
    dsub = d[:, None] * ls.astype(F)
    L = _requant(x, _unsub(L, nb) - 32, dsub, np.zeros_like(dsub), -32, 31) + 32
    L = np.where(zero[:, None], 0, L)
    out = np.concatenate([pack_q6(L), ls.view(np.uint8), _f16_bytes(d)], axis=1)
    out[zero] = 0
    return out


def pack_q6(L: np.ndarray) -> np.ndarray:
    """(nb, 256) codes in [0, 64) -> Q6_K's ql[128] (low 4 bits) and qh[64] (high 2 bits), (nb, 192)."""
    nb = L.shape[0]
    L = L.astype(np.uint8).reshape(nb, 2, 4, 32)   # [half, quarter, l]
    ql = np.stack([L[:, :, 0] & 15 | (L[:, :, 2] & 15) << 4, L[:, :, 1] & 15 | (L[:, :, 3] & 15) << 4], axis=2)
    qh = L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64)], axis=1)


def decode_q6_k(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 210)
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 2, 32)
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)
    low = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = (low | high << 4).astype(np.int32).reshape(nb, QK) - 32
    sc = b[:, 192:208].view(np.int8).astype(F)
    d = _f16_read(b[:, 208:210])
    return ((d[:, None] * sc)[..., None] * q.reshape(nb, 16, 16).astype(F)).reshape(nb, QK)
