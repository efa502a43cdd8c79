"""GPTQ error feedback onto a caller's block format (`QuantJob.target`: GGUF's Q4_K, Q5_0, Q6_K, IQ4_NL ...).

The columns are walked in order, as in `algorithm._gptq_quantize`, but a group's grid is the
format's block (32 inputs for the legacy types and IQ4_NL, a 256-input super-block for the K
types and IQ4_XS). At the first column of each block, the block's header (scales, mins, the K
types' 6-bit sub-block scales, IQ4's block scale) is searched on the current, error-updated
weights by the format's own importance-weighted search, the importance being the Hessian's
diagonal over 2 (the mean x**2 of the Linear's calibration input, what llama.cpp's imatrix
holds). Each column is then rounded to the nearest point of that fixed grid and its error fed
forward to the columns not yet rounded. The codes and headers pack into the format's bytes; the
grid's values (what the model computes with for the next Linears) are those bytes decoded.

Each Linear of a group gets its own format (q/k/v may differ); rows are independent given H, so
this equals GPTQ on the row-stacked group, with one Cholesky factor shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from quantkit.calib.pipeline import BlockCalib
from quantkit.compute import one_cpu_thread
from quantkit.methods.gptq.activations import QuantizedInputStats, least_squares_target, vec_dot_type
from quantkit.methods.gptq.algorithm import GPTQParams, HessianAccumulator, group_aware_order, inverse_cholesky

log = logging.getLogger(__name__)


@dataclass
class GridResult:
    data: np.ndarray    # (out, in / block * block bytes) uint8: the format's bytes, row by row
    values: Tensor      # (out, in) float32: the bytes decoded
    loss: float         # Σ err² / 2, err = (w - q) / U[j, j] (as GPTQResult.loss)


def gptq_on_grid(weight: Tensor, upper: Tensor, codec: Any, importance: np.ndarray, block_size: int = 128,
                 order: Tensor | None = None) -> GridResult:
    """Round `weight` (out, in) onto `codec`'s blocks with error feedback through `upper` (in, in), the upper
    Cholesky factor of the damped H⁻¹ (of H in `order`). `importance` (in,): the block search's weights.
    `order` (in,): the processing order, a permutation that keeps each block's columns together (GAR,
    `algorithm.group_aware_order`); the bytes and values come back in natural order. Inputs are not modified."""
    with one_cpu_thread(weight.device):
        return _gptq_on_grid(weight, upper, codec, np.asarray(importance, np.float32), block_size, order)


def _gptq_on_grid(weight: Tensor, upper: Tensor, codec: Any, importance: np.ndarray, block_size: int,
                  order: Tensor | None) -> GridResult:
    out_f, in_f = weight.shape
    blk = codec.block
    if in_f % blk:
        raise ValueError(f"{in_f} inputs do not split into {codec.name} blocks of {blk}")
    device = weight.device
    perm = np.arange(in_f) if order is None else order.cpu().numpy()
    w = weight.detach().to(torch.float32)
    wt = (w if order is None else w[:, order.to(device)]).t().contiguous()  # (in, out): row j = j-th processed column
    values_t = torch.empty_like(wt)
    diag = upper.diagonal()
    bs = -(-max(1, block_size) // blk) * blk                    # lazy batches hold whole blocks
    parts: dict[int, tuple[Any, np.ndarray]] = {}               # natural block index -> (grid, codes)
    loss = 0.0
    grid, codes, local = None, np.empty(0), np.arange(blk)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        cols = wt[i1:i2]
        u_blk = upper[i1:i2, i1:i2]
        err = torch.empty(i2 - i1, out_f, dtype=torch.float32, device=device)
        for i in range(i2 - i1):
            j = i1 + i
            k = j % blk
            if k == 0:  # the block's grid, searched on its current (error-updated) weights in natural order
                b = int(perm[j]) // blk
                local = perm[j:j + blk] - b * blk               # natural position of each processed column
                sigma2 = wt.square().mean(0).cpu().numpy()     # each row's mean x**2 (legacy types' weighting)
                x = wt[j:j + blk][torch.from_numpy(np.argsort(local)).to(device)].t().cpu().numpy()
                grid = codec.fit(x, importance[b * blk:(b + 1) * blk], sigma2)
                codes = np.empty((out_f, blk), np.int64)
                parts[b] = (grid, codes)
            idx, val = grid.round(int(local[k]), cols[i].cpu().numpy())
            codes[:, local[k]] = idx
            q = torch.from_numpy(np.ascontiguousarray(val, np.float32)).to(device)
            values_t[j] = q
            e = err[i]
            torch.sub(cols[i], q, out=e)
            e.div_(diag[j])
            if i + 1 < i2 - i1:
                cols[i + 1:].addr_(u_blk[i, i + 1:], e, alpha=-1.0)
        if i2 < in_f:
            wt[i2:].addmm_(upper[i1:i2, i2:].t(), err, alpha=-1.0)
        loss += float(err.double().pow(2).sum()) / 2
    data = np.concatenate([parts[b][0].pack(parts[b][1]) for b in range(in_f // blk)], axis=1)
    values = values_t.t() if order is None else values_t.t()[:, torch.argsort(order.to(device))]
    return GridResult(data, values.contiguous(), loss)


def grid_group(codecs: dict[str, Any], prefix: str, params: GPTQParams, alpha: float = 1.0):
    """The group quantizer `gptq_block` runs per Linear group when rounding onto a target format.

    `codecs`: full Linear name -> codec; `prefix`: the block's (e.g. "model.layers.3.").
    Returns {relative name: bytes} for the Linears that have a codec; each gets its decoded grid values
    written back, so the next groups and blocks calibrate on the quantized model. `h`: the group's Hessian, or its
    `activations.QuantizedInputStats` (`--opt activations=q8`): each Linear then rounds for its weight type's 8-bit
    activations, towards the least-squares target when the statistics hold the cross term (`alpha`: that far from
    the weight itself, W + alpha (W* - W))."""

    def quantize(calib: BlockCalib, group: Any, h: Any) -> dict[str, np.ndarray]:
        chosen = [(n, m) for n, m in zip(group.names, group.modules, strict=True) if prefix + n in codecs]
        if not chosen:
            return {}
        hessians = ({None: h} if isinstance(h, Tensor)                 # activation type -> H (None: float)
                    else {**h.done, **({} if h.h_float is None else {None: h.h_float})})
        prepared: dict[Any, tuple[Tensor, Tensor, np.ndarray]] = {}
        factors: dict[tuple, tuple[Tensor, Tensor | None, float]] = {}  # (kind, block width) -> (U, order, damp)

        def prepare(kind: Any) -> tuple[Tensor, Tensor, np.ndarray]:
            if kind not in prepared:
                hk = hessians[kind].to(torch.float32).clone()
                dead = hk.diagonal() == 0
                importance = (hk.diagonal() / 2).cpu().numpy().astype(np.float32)   # mean x**2 per input
                if bool(dead.any()):
                    hk[dead, dead] = 1.0
                prepared[kind] = (hk, dead, importance)
            return prepared[kind]

        def factor(kind: Any, blk: int) -> tuple[Tensor, Tensor | None, float]:
            if (kind, blk) not in factors:  # GAR: whole blocks by their largest H diagonal, columns inside by theirs
                hk = prepare(kind)[0]
                order = group_aware_order(hk.diagonal(), blk) if params.group_aware else None
                hp = hk if order is None else hk[order][:, order]
                upper, damp = inverse_cholesky(hp, params.damp, params.damp_retries, params.damp_growth)
                if upper is None:
                    log.warning("GPTQ: Cholesky failed even with damp %.3g for %s; rounding without error feedback",
                                damp, ",".join(group.names))
                    upper = torch.eye(hk.shape[0], dtype=torch.float32, device=hk.device)
                factors[kind, blk] = (upper, order, damp)
            return factors[kind, blk]

        out = {}
        for name, mod in chosen:
            codec = codecs[prefix + name]
            kind = None if isinstance(h, Tensor) else vec_dot_type(codec.name)
            if kind not in hessians:
                raise ValueError(f"{prefix}{name} ({codec.name}): no statistics for its activations {kind}")
            rounding = kind if kind is not None and h.h_float is None else None  # the Hessian GPTQ rounds with
            hk, dead, importance = prepare(rounding)
            upper, order, damp = factor(rounding, codec.block)
            w = calib.master(mod).to(torch.float32).clone()
            if kind is not None and h.cross is not None:  # the least-squares weight for the quantized activations
                hq = prepare(kind)[0]
                v = least_squares_target(w, h.cross[kind], hq, params.damp * float(hq.diagonal().mean()))
                w = v if alpha == 1.0 else w.add_(v.sub_(w), alpha=alpha)
            w[:, dead] = 0.0  # inputs calibration never reached: the weight there cannot matter
            res = gptq_on_grid(w, upper, codec, importance, params.block_size, order)
            mod.weight.data.copy_(res.values.to(mod.weight.dtype))
            out[name] = res.data
            log.debug("gptq %s onto %s%s: loss %.4g damp %.3g", name, codec.name,
                      "" if kind is None else f" ({kind} activations)", res.loss, damp)
        return out

    return quantize


def input_stats(codecs: dict[str, Any], prefix: str, cross: bool, float_hessian: bool = False):
    """`gptq_block`'s accumulator per Linear group for `--opt activations=q8`: the group's inputs quantized as each
    of its Linears' weight types takes them (`activations.QuantizedInputStats`); a plain Hessian for a group
    without an 8-bit activation type."""

    def make(calib: BlockCalib, group: Any) -> Any:
        kinds = {vec_dot_type(codecs[prefix + n].name) for n in group.names if prefix + n in codecs} - {None}
        n_in = group.modules[0].in_features
        if not kinds:
            return HessianAccumulator(n_in, calib.device)
        return QuantizedInputStats(n_in, kinds, calib.device, cross, float_hessian)

    return make
