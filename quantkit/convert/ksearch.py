"""The scale/min searches behind llama.cpp's K-quant and importance-weighted encodings, vectorised.

Written from the format's definition in llama.cpp's ggml-quants.c (make_qx_quants,
make_q3_quants, make_qkx2_quants / make_qkx3_quants, make_qp_quants): same float32
arithmetic, same operation order, same tie rules, so the codes they choose are llama.cpp's.

Layout: every array is (n, B): the n weights of a (sub-)block along axis 0, the B blocks
along axis 1, so a sum over a block is n contiguous vector additions in float32, in the
order llama.cpp adds them (numpy's pairwise `sum` would round differently).
"""

from __future__ import annotations

import numpy as np

F = np.float32
EPS = F(1e-15)  # GROUP_MAX_EPS: a block whose largest |x| is below it is all zero


def ssum(a: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0: (n, B) -> (B,)."""
    acc = a[0].astype(F, copy=True)
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def nint(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: round half to even, as an int32 array."""
    return np.rint(v).astype(np.int32)


def fp16(v: np.ndarray) -> np.ndarray:
    """Round to fp16 and back to float32 (the stored super-block scale, as the decoder reads it)."""
    return np.asarray(v, F).astype(np.float16).astype(F)


def absmax_signed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(signed value of largest |x|, that |x|) per block; the first one wins a tie, as in llama.cpp."""
    ax = np.abs(x)
    i = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return x[i, cols], ax[i, cols]


def make_qx(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (make_qx_quants, rmse_type 1): returns (scale (B,), L (n, B) in [0, 2*nmax)).

    Weights are `qw` or x**2. The grid is scale * (L - nmax); 19 trial inverse scales
    -(nmax + 0.1*is)/max, is in [-9, 9], keep the one with the best weighted fit.
    """
    mx, amax = absmax_signed(x)
    zero = amax < EPS
    mx = np.where(zero, F(1), mx)
    w = x * x if qw is None else qw
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(nint(iscale * x), -nmax, nmax - 1).astype(F)
        return lv, ssum(wx * lv), ssum(w * lv * lv)

    with np.errstate(divide="ignore", invalid="ignore"):
        lv, sumlx, suml2 = trial(F(-nmax) / mx)
        L = lv.astype(np.int32) + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, F(0)).astype(F)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            lv, sumlx, suml2 = trial(-(F(nmax) + F(0.1) * F(step)) / mx)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(upd, lv.astype(np.int32) + nmax, L)
            scale = np.where(upd, sumlx / suml2, scale).astype(F)
            best = np.where(upd, scale * sumlx, best).astype(F)
    return np.where(zero, F(0), scale), np.where(zero, 0, L)


def make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse: x**2-weighted, then 5 passes of one-weight-at-a-time refinement.

    Returns (scale (B,), L (n, B) in [0, 2*nmax)). A pass that changes nothing leaves the
    state as it was, so running all 5 passes equals llama.cpp's early exit.
    """
    mx, amax = absmax_signed(x)
    zero = amax < EPS
    mx = np.where(zero, F(1), mx)
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.clip(nint((F(-nmax) / mx) * x), -nmax, nmax - 1)
        Lf = L.astype(F)
        sumlx = ssum(w * x * Lf)
        suml2 = ssum(w * Lf * Lf)
        for _ in range(5):
            for i in range(x.shape[0]):
                wi, xi, li = w[i], x[i], L[i].astype(F)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new = np.clip(nint(xi * sl2 / np.where(slx > 0, slx, F(1))), -nmax, nmax - 1)
                nf = new.astype(F)
                slx2 = slx + wi * xi * nf
                sl22 = sl2 + wi * nf * nf
                upd = (slx > 0) & (new != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[i] = np.where(upd, new, L[i])
                sumlx = np.where(upd, slx2, sumlx).astype(F)
                suml2 = np.where(upd, sl22, suml2).astype(F)
        scale = np.where(suml2 > 0, sumlx / suml2, F(0)).astype(F)
    return np.where(zero, F(0), scale), np.where(zero, 0, L + nmax)


def make_qkx(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric scale/min search (make_qkx2_quants / make_qkx3_quants; the caller supplies the weights).

    Grid: x ~ scale * L - the_min, L in [0, nmax], the_min >= 0. Starts from the min/max
    fit, then tries inverse scales (rmin + rdelta*is + nmax)/(max - min), is = 0..nstep,
    each followed by the weighted least-squares (scale, min) of its codes.
    Returns (scale (B,), the_min (B,), L (n, B)).
    """
    mn = np.minimum(x.min(axis=0), F(0))
    mx = x.max(axis=0)
    flat = mx <= mn
    sum_w = ssum(w)
    sum_x = ssum(w * x)

    def err(scale: np.ndarray, mins: np.ndarray, lv: np.ndarray) -> np.ndarray:
        d = scale * lv + mins - x
        return ssum(w * (np.abs(d) if use_mad else d * d))

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F(nmax) / np.where(flat, F(1), mx - mn)
        scale = (F(1) / iscale).astype(F)
        L = np.clip(nint(iscale * (x - mn)), 0, nmax).astype(F)
        best = err(scale, mn, L)
        for step in range(nstep + 1) if nstep >= 1 else ():
            # llama.cpp moves `min` to each better trial's, so later trials span max - (that min)
            span = np.where(flat, F(1), mx - mn)
            lv = np.clip(nint(((F(rmin) + F(rdelta) * F(step) + F(nmax)) / span) * (x - mn)), 0, nmax).astype(F)
            wl = w * lv
            sl, sl2, sxl = ssum(wl), ssum(wl * lv), ssum(wl * x)
            D = sum_w * sl2 - sl * sl
            ok = D > 0
            Dd = np.where(ok, D, F(1))
            ts = (sum_w * sxl - sum_x * sl) / Dd
            tm = (sl2 * sum_x - sl * sxl) / Dd
            pos = tm > 0
            tm = np.where(pos, F(0), tm).astype(F)
            ts = np.where(pos, sxl / np.where(sl2 != 0, sl2, F(1)), ts).astype(F)
            cur = err(ts, tm, lv)
            upd = ok & (cur < best)
            L = np.where(upd, lv, L)
            best = np.where(upd, cur, best)
            scale = np.where(upd, ts, scale).astype(F)
            mn = np.where(upd, tm, mn).astype(F)
    return (np.where(flat, F(0), scale), -mn, np.where(flat, F(0), L).astype(np.int32))


def qkx2_weights(x: np.ndarray) -> np.ndarray:
    """make_qkx2's weights in the reference Q4_K/Q5_K encoders: rms of the sub-block + |x|."""
    av = np.sqrt(ssum(x * x) / F(x.shape[0]))
    return av + np.abs(x)


def make_qp(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: a positive scale for non-negative `x` (the sub-block scales), weighted by `qw`.

    Returns (scale (B,), L (n, B) in [0, nmax]).
    """
    mx = np.maximum(x.max(axis=0), F(0))
    zero = mx < EPS
    mx = np.where(zero, F(1), mx)

    def mse(scale: np.ndarray, lv: np.ndarray) -> np.ndarray:
        d = x - scale * lv
        return ssum(qw * d * d)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (F(nmax) / mx).astype(F)
        best = mse(F(1) / iscale, nint(iscale * x).astype(F))
        for step in range(-4, 5):
            if step == 0:
                continue
            isc = ((F(0.1) * F(step) + F(nmax)) / mx).astype(F)
            cur = mse(F(1) / isc, np.minimum(nint(isc * x), nmax).astype(F))
            upd = cur < best
            best = np.where(upd, cur, best)
            iscale = np.where(upd, isc, iscale).astype(F)
        L = np.minimum(nint(iscale * x), nmax)
        Lf = L.astype(F)
        sumlx = ssum(qw * x * Lf)
        suml2 = ssum(qw * Lf * Lf)
        for _ in range(5):
            for i in range(x.shape[0]):
                wi, xi, li = qw[i], x[i], L[i].astype(F)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                ok = (slx > 0) & (sl2 > 0)
                new = np.minimum(nint(xi * sl2 / np.where(ok, slx, F(1))), nmax)
                nf = new.astype(F)
                slx2 = slx + wi * xi * nf
                sl22 = sl2 + wi * nf * nf
                upd = ok & (new != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[i] = np.where(upd, new, L[i])
                sumlx = np.where(upd, slx2, sumlx).astype(F)
                suml2 = np.where(upd, sl22, suml2).astype(F)
        scale = np.where(suml2 > 0, sumlx / suml2, F(0)).astype(F)
    return np.where(zero, F(0), scale), np.where(zero, 0, L)


def importance(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """llama.cpp's per-weight importance with an imatrix: qw * sqrt(sigma2 + x**2)."""
    return qw * np.sqrt(sigma2 + x * x)
