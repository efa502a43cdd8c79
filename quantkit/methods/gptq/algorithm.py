"""GPTQ (Frantar et al. 2022) as pure tensor functions, separate from any orchestration.

Shapes: a weight W is (out, in); its Hessian H is (in, in), H = 2 XᵀX / n over the
n calibration tokens X (n, in) that the Linear sees. GPTQ quantizes W column by
column (input by input) and spreads each column's rounding error over the columns
not yet quantized, weighted by the upper Cholesky factor U of H⁻¹:

    err_j   = (w_j - q_j) / U[j, j]
    w_k    -= err_j * U[j, k]          for every k > j

Rows are independent given H, so Linears that read the same input (q/k/v,
gate/up) are quantized in one call on their row-stacked weights.

Columns are processed in blocks of `block_size`: inside a block the update is a
rank-1 `addr_` on the block only; the rest of W gets one `addmm_` per block
(the "lazy batch" of the paper). The loop runs on Wᵀ so a column is a contiguous row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.grid import FP8_DTYPE, QuantizedWeight, fit_grid, fp8_values, quantize_weight, weight_grid
from quantkit.compute import one_cpu_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQParams:
    """Everything the algorithm needs to know about one call.

    damp:          fraction of the mean Hessian diagonal added to the diagonal.
    damp_retries:  if Cholesky fails, retry this many times, multiplying damp by `damp_growth`.
    group_aware:   group-aware reordering (GAR, Gafni et al. 2025) when desc_act is off: whole
                   groups in decreasing order of their largest Hessian diagonal, and inside a
                   group its columns by decreasing diagonal. A group's columns stay together, so
                   each group still gets one grid fitted on its own columns and g_idx stays
                   trivial: the checkpoint is the plain format, only the error feedback improves.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    desc_act: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    damp_retries: int = 3
    damp_growth: float = 10.0
    group_aware: bool = False
    number: str = "int"          # "float": FP8 e4m3 values on a per-channel (or per-tensor) scale
    per_tensor: bool = False     # one scale (and zero) for the whole weight (group_size -1)
    observer: str = "minmax"     # FP8 scales: max|w| / 448, or "mse" (grid.fit_fp8)

    @property
    def plain(self) -> bool:
        """Integer groups or channels: the grid `fit_grid` fits per row."""
        return self.number == "int" and not self.per_tensor


@dataclass
class GPTQResult:
    weight: QuantizedWeight   # codes for the (row-stacked) weight given
    loss: float               # Σ err² / 2 with err = (w - q) / U[j,j]: GPTQ's own error measure
    damp: float               # damp fraction finally used (0 if RTN fallback)
    fallback: bool            # True when Cholesky kept failing and RTN was used


LOW_PRECISION_TOKENS = 512  # tokens per 16-bit XᵀX product (HessianAccumulator)


class HessianAccumulator:
    """Streams XᵀX over calibration batches in float32 (in place, addmm_ per batch).

    XᵀX is symmetric, so only its upper tiles are computed: the `in` features split into k
    tiles of about `tile` columns and the (i, j ≥ i) products cost (k + 1) / 2k of the full
    product (measured 1.2-1.3x faster at 576 and 1536 features, 4096 tokens, 2 threads). The
    lower triangle is mirrored once, in `hessian()`, so H is exactly symmetric.
    """

    def __init__(self, n_features: int, device: torch.device | str, tile: int = 256, track_absmax: bool = False,
                 low_precision_products: bool = False):
        self.sum = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.tokens = 0
        # max |x| (static activation scales), only when asked: it costs 5% of a bf16 GPTQ run
        self.absmax = torch.zeros((), dtype=torch.float32, device=device) if track_absmax else None
        self.low_precision_products = low_precision_products
        k = -(-n_features // tile) if n_features >= 2 * tile else 1
        self.bounds = [n_features * i // k for i in range(k + 1)]  # tile edges, (k + 1,)

    def add(self, x: Tensor) -> None:
        """x: (..., in) activations of one batch; any float dtype.

        With `low_precision_products` and a 16-bit x, each tile's product runs in x's dtype (exact
        products, float32 accumulation inside the GEMM, the batch's tile rounded once to 16 bits) and is
        summed in float32: 3-4x faster than float32 GEMMs on CPUs with AMX / AVX512-BF16 and on GPUs.
        Otherwise x is converted to float32 first.
        """
        low = self.low_precision_products and x.dtype in (torch.bfloat16, torch.float16)
        x2 = x.reshape(-1, x.shape[-1]).to(self.sum.device, x.dtype if low else torch.float32)  # (tokens, in)
        b = self.bounds
        # 16-bit products LOW_PRECISION_TOKENS tokens at a time: each partial tile is rounded once, so the
        # relative error of the sum falls with the number of parts (measured on SmolLM2: |ΔH|/|H| 6e-4 at 4096
        # tokens a product, 2.4e-4 at 512; GPTQ's loss on the exact H then within ±1.2% of the float32 H's)
        for part in (x2.split(LOW_PRECISION_TOKENS) if low else (x2,)):
            for i in range(len(b) - 1):
                xi = part[:, b[i]:b[i + 1]]
                for j in range(i, len(b) - 1):
                    tile = self.sum[b[i]:b[i + 1], b[j]:b[j + 1]]
                    if low:
                        tile.add_(torch.mm(xi.t(), part[:, b[j]:b[j + 1]]))
                    else:
                        tile.addmm_(xi.t(), part[:, b[j]:b[j + 1]])
        self.tokens += x2.shape[0]
        if self.absmax is not None and x2.numel():
            torch.maximum(self.absmax, x2.abs().amax().float(), out=self.absmax)

    def hessian(self) -> Tensor:
        """H = 2 XᵀX / n, (in, in) float32. Consumes the running sum (no copy)."""
        if self.tokens == 0:
            raise ValueError("no calibration activations reached this Linear")
        return self.symmetric().mul_(2.0 / self.tokens)

    def symmetric(self) -> Tensor:
        """The running XᵀX with its lower triangle replaced by the upper one's transpose (in place).

        The upper tiles hold the whole upper triangle; the diagonal tiles' own lower halves
        are overwritten too, since a GEMM does not promise an exactly symmetric result.
        """
        upper = torch.triu(self.sum)
        self.sum.copy_(upper.add_(torch.triu(self.sum, 1).t()))
        return self.sum


def inverse_cholesky(h: Tensor, damp: float, retries: int = 3, growth: float = 10.0) -> tuple[Tensor | None, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H); (in, in) float32.

    Computed in float64 for stability. On failure damp grows by `growth`, at most
    `retries` more times; returns (None, last damp) if every try fails.
    """
    # At most two (in, in) float64 matrices alive at once (with h itself, float32): each step's input is
    # freed as soon as the next exists. At in = 28672 (a 70B down_proj) one is 6.6 GB; five were alive before.
    n = h.shape[0]
    eye = torch.arange(n, device=h.device)
    mean_diag = float(h.to(torch.float64).diagonal().mean())
    d = damp
    for attempt in range(retries + 1):
        hd = h.to(torch.float64)
        hd[eye, eye] += d * mean_diag
        lower, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper.to(torch.float32), d
            del upper
        else:
            del lower
        if attempt < retries:
            log.info("Cholesky failed with damp %.4g; retrying with %.4g", d, d * growth)
            d *= growth
    return None, d


def group_aware_order(diag: Tensor, gs: int) -> Tensor:
    """GAR processing order of the `in` columns: (in,) permutation, groups kept contiguous.

    diag: (in,) Hessian diagonal. Groups (gs contiguous columns) sort by their largest
    diagonal, descending; columns inside a group by their diagonal, descending. Both
    sorts are stable, so ties keep natural order (deterministic).
    """
    n = diag.numel()
    if n % gs:
        raise ValueError(f"group_size {gs} does not divide {n} columns")
    d = diag.reshape(n // gs, gs)                                        # (G, gs)
    local = torch.sort(d, dim=1, descending=True, stable=True)            # values, (G, gs) indices
    groups = torch.argsort(local.values[:, 0], descending=True, stable=True)  # (G,) by group max
    base = (groups * gs)[:, None]                                        # first column of each group
    return (base + local.indices[groups]).reshape(n)


def _group_params(w: Tensor, p: GPTQParams, gs: int) -> tuple[Tensor, Tensor]:
    """(out, in) -> scale, zero (out, n_groups) fitted on contiguous groups of `gs` columns."""
    out_f, in_f = w.shape
    scale, zero = fit_grid(w.reshape(out_f, in_f // gs, gs), p.bits, p.sym)
    return scale.squeeze(-1), zero.squeeze(-1)


def gptq_quantize(weight: Tensor, h: Tensor, p: GPTQParams, bias: Tensor | None = None) -> GPTQResult:
    """Quantize `weight` (out, in) against Hessian `h` (in, in). Neither input is modified."""
    with one_cpu_thread(weight.device):
        return _gptq_quantize(weight, h, p, bias)


def _gptq_quantize(weight: Tensor, h: Tensor, p: GPTQParams, bias: Tensor | None) -> GPTQResult:
    out_f, in_f = weight.shape
    gs = in_f if p.group_size == -1 else p.group_size
    maxq = (1 << p.bits) - 1
    device = weight.device
    w = weight.detach().to(torch.float32).clone()
    h = h.to(device=device, dtype=torch.float32).clone()

    # Dead inputs (never non-zero in calibration): the weight there cannot matter; pin it to 0.
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

    # Static groups: grids fitted once on the (dead-zeroed) weight in natural column order.
    static = p.static_groups and p.group_size != -1
    if static or p.group_size == -1:
        s_all, z_all = _group_params(w, p, gs) if p.plain else weight_grid(w, p.bits, p.sym, p.number, p.per_tensor,
                                                                                   p.observer)

    perm: Tensor | None = None
    gar = p.group_aware and not p.desc_act and p.group_size != -1
    if p.desc_act:
        # act-order: largest Hessian diagonal (most active input) first
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    elif gar:
        perm = group_aware_order(h.diagonal(), gs)
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]

    upper, damp = inverse_cholesky(h, p.damp, p.damp_retries, p.damp_growth)
    if upper is None:
        log.warning("GPTQ: Cholesky failed even with damp %.3g for a (%d, %d) weight; using RTN for it",
                    damp, out_f, in_f)
        qw = quantize_weight(weight, p.bits, p.group_size, p.sym, p.number, p.per_tensor, bias, p.observer)
        return GPTQResult(qw, float("nan"), 0.0, True)
    del h

    # Work on the transpose: row j of wt is input column j (contiguous), (in, out).
    wt = w.t().contiguous()
    codes_t = torch.empty(in_f, out_f, dtype=torch.float32, device=device)
    n_groups = in_f // gs
    scales = torch.empty(n_groups, out_f, dtype=torch.float32, device=device)
    zeros = torch.empty(n_groups, out_f, dtype=torch.float32, device=device)
    # group of each processed column: its position's group for desc_act (g_idx follows), its own
    # natural group when the grids are natural (static groups, GAR keeps groups contiguous)
    col_group = torch.arange(in_f, device=device) // gs if perm is None or not (static or gar) else perm // gs
    if static or p.group_size == -1:
        scales.copy_(s_all.t())
        zeros.copy_(z_all.t())
    # group of each (processed-order) column, as python ints for the loop
    col_group_list = col_group.tolist()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    diag = upper.diagonal()
    bs = max(1, p.block_size)
    fp8 = p.number == "float"

    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        blk = wt[i1:i2]                       # (B, out) view: columns i1..i2 of W
        u_blk = upper[i1:i2, i1:i2]           # (B, B)
        err = torch.empty(i2 - i1, out_f, dtype=torch.float32, device=device)  # scaled errors
        for i in range(i2 - i1):
            j = i1 + i
            g = col_group_list[j]
            if not static and p.group_size != -1 and j % gs == 0:
                # fit the group on its current (error-updated) values: rows j..j+gs of wt
                s, z = fit_grid(wt[j:j + gs].t(), p.bits, p.sym)  # (out, 1)
                scales[g] = s.squeeze(-1)
                zeros[g] = z.squeeze(-1)
            s, z = scales[g], zeros[g]
            col = blk[i]
            c = fp8_values(col, s) if fp8 else torch.clamp(torch.round(col / s) + z, 0, maxq)  # (out,)
            codes_t[j] = c
            e = err[i]
            torch.sub(col, s * (c - z), out=e)
            e.div_(diag[j])
            if i + 1 < i2 - i1:
                blk[i + 1:].addr_(u_blk[i, i + 1:], e, alpha=-1.0)
        if i2 < in_f:
            wt[i2:].addmm_(upper[i1:i2, i2:].t(), err, alpha=-1.0)
        loss += err.double().pow(2).sum() / 2

    codes = codes_t.t()  # (out, in) in processed order
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if static or gar:
            g_idx = torch.arange(in_f, device=device) // gs
        else:
            g_idx = inv // gs  # column c was the inv[c]-th processed, in group inv[c] // gs
    else:
        g_idx = torch.arange(in_f, device=device) // gs
    if p.group_size == -1:
        g_idx = torch.zeros(in_f, dtype=torch.long, device=device)
    qw = QuantizedWeight(
        codes=codes.to(FP8_DTYPE if fp8 else torch.uint8).contiguous(),
        scales=scales.t().contiguous(),
        zeros=zeros.t().to(torch.uint8).contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=p.bits,
        group_size=p.group_size,
        sym=p.sym,
        bias=None if bias is None else bias.detach().float().clone(),
    )
    return GPTQResult(qw, float(loss), damp, False)


def split_rows(qw: QuantizedWeight, sizes: Sequence[int], biases: Sequence[Tensor | None]) -> list[QuantizedWeight]:
    """Undo the row stacking of Linears quantized together: one QuantizedWeight per `sizes` entry."""
    out = []
    start = 0
    for n, b in zip(sizes, biases, strict=True):
        sl = slice(start, start + n)
        out.append(QuantizedWeight(
            codes=qw.codes[sl].contiguous(), scales=qw.scales[sl].contiguous(), zeros=qw.zeros[sl].contiguous(),
            g_idx=qw.g_idx.clone(), bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
            bias=None if b is None else b.detach().float().clone(),
        ))
        start += n
    if start != qw.codes.shape[0]:
        raise ValueError(f"row sizes sum to {start}, weight has {qw.codes.shape[0]} rows")
    return out
