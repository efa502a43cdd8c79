"""SmoothQuant's smoothing on one decoder block (Xiao et al. 2023), with α chosen by measurement.

For each of the architecture's mappings (previous op -> the Linears it feeds; the same table AWQ folds
into), with per-input-channel maxima a_j = max |x_j| over the calibration tokens and w_j = max |W_:,j|
over the mapping's Linears, the smoothing scale is

    s_j = a_j^α / w_j^(1-α)        (clamped to >= 1e-5, as llm-compressor does)

and x / s, W * s are folded exactly into the previous op and the Linears (`quantkit.methods.scaling`).

α is not a constant: for each mapping (per layer) every candidate α, and "no smoothing", is scored on a seeded
subsample of the calibration tokens that reach it: the mapping's Linears simulated on the scheme's grid (RTN
weights W * s, and inputs x / s quantized as the scheme's activations say: per token, or per tensor with the
static scale the calibration maxima give) against their float output x W^T. The smallest mean squared error
wins, so smoothing is never chosen where it does not lower the measured error. A fixed α (the `smooth_alpha`
option) skips the search. Int8 W8A8 candidates are scored on the codes' exact integer product (`torch._int_mm`,
as the W8A8 kernel computes it): half the search's CPU time on Gemma 3 270M, the same choices. (Scoring the
whole block per candidate cost ~95 s a block on SmolLM2 on the shared 2-core machine; the Linears' own outputs on
512 tokens cost about a second a block.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.calib.hooks import HookSet
from quantkit.calib.pipeline import BlockCalib, StopForward
from quantkit.grid import QuantizedWeight, int8_activations, quantize_activations, quantize_weight
from quantkit.methods.scaling import fold_scale, usable_mappings
from quantkit.models.arch import ArchSpec, AWQMapping
from quantkit.scheme import QuantScheme

log = logging.getLogger(__name__)

MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float | None      # fixed migration strength; None: search `grid`
    grid: tuple[float, ...]  # candidate α values (no smoothing is always a candidate too)
    score_tokens: int        # calibration tokens (a seeded subsample) each mapping's α is scored on
    seed: int = 0


def alpha_grid(n: int, low: float = 0.3, high: float = 0.9) -> tuple[float, ...]:
    """n candidate α evenly spaced in [low, high] (the range where SmoothQuant's papers find the best α)."""
    if n == 1:
        return ((low + high) / 2,)
    return tuple(round(low + (high - low) * i / (n - 1), 4) for i in range(n))


def smoothing_scale(act_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s (C,) float32 for input-channel maxima `act_max` (C,) and the Linears' weights (out, C)."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_max.float().clamp(min=MIN_SCALE)
    return (a.pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)


def _input_site(m: AWQMapping) -> str:
    return m.input or m.linears[0]


@dataclass
class Site:
    """What one pass records about the input x of a mapping's Linears."""

    amax: Tensor                 # (C,) max |x_j| over every calibration token
    sample: list[Tensor]         # token subsample rows (n, C), float32

    @property
    def x(self) -> Tensor:
        return torch.cat(self.sample)


@torch.no_grad()
def collect(calib: BlockCalib, mappings: list[AWQMapping], score_tokens: int, seed: int) -> dict[str, Site]:
    """One pass over the calibration batches: each mapping's input maxima and a seeded token subsample. A batch
    stops once every site's input is recorded (nothing after the last site is computed)."""
    sites: dict[str, Site] = {}
    per_batch = -(-score_tokens // max(calib.n_batches, 1))
    names = {_input_site(m) for m in mappings}
    seen: dict[int, set[str]] = {}

    def site_hook(name: str):
        def hook(_mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            m = x.abs().amax(dim=0).float()
            gen = torch.Generator().manual_seed(seed * 1_000_003 + calib.index * 10_007 + calib.batch)
            idx = torch.randperm(x.shape[0], generator=gen)[:per_batch].sort().values.to(x.device)
            row = x[idx].float().clone()
            if name in sites:
                torch.maximum(sites[name].amax, m, out=sites[name].amax)
                sites[name].sample.append(row)
            else:
                sites[name] = Site(m, [row])
            done = seen.setdefault(calib.batch, set())
            done.add(name)
            if done == names:  # every site's input seen: the rest of the block (down_proj on) is not needed
                raise StopForward
        return hook

    def install(hs: HookSet) -> None:
        for site in sorted(names):
            hs.pre(calib.block.get_submodule(site), site_hook(site))

    calib.forward(hooks=install)
    return sites


def simulated_error(x: Tensor, amax: Tensor, w: Tensor, ref: Tensor, s: Tensor | None, scheme: QuantScheme) -> float:
    """Mean squared error of the Linears' outputs (their stacked weight w (rows, C)) with inputs x / s and
    weights w * s on the scheme's grid (RTN), against their float outputs `ref` = x w^T; s None: no smoothing."""
    if s is not None:
        s = s.float().to(x.device)
        x, w, amax = x / s, w * s, amax.float() / s
    qw = quantize_weight(w, scheme.bits, scheme.group_size, scheme.sym, scheme.type, scheme.weight_strategy == "tensor")
    act = scheme.input_activations
    static = None
    if act is not None and not act.dynamic:
        static = (amax.max() / act.qmax).clamp(min=1e-8).reshape(1)
    if _integer_product(x, w, scheme):
        return _int8_error(x, qw, static, ref)
    if act is not None:
        x = quantize_activations(x, act.type, static)
    return float((x @ qw.dequantize().t() - ref).pow(2).mean())


def _integer_product(x: Tensor, w: Tensor, scheme: QuantScheme) -> bool:
    """Whether the simulated product can run as W8A8's own int8 GEMM: symmetric int8 weights per channel, int8
    activations, a CPU (`torch._int_mm`; widths multiples of 8)."""
    act = scheme.input_activations
    return (x.device.type == "cpu" and hasattr(torch, "_int_mm") and act is not None and act.type == "int"
            and scheme.type == "int" and scheme.bits == 8 and scheme.sym and scheme.group_size == -1
            and scheme.weight_strategy != "tensor" and x.shape[1] % 8 == 0 and w.shape[0] % 8 == 0)


def _int8_error(x: Tensor, qw: QuantizedWeight, static: Tensor | None, ref: Tensor) -> float:
    """`simulated_error`'s product on the int8 codes: acc = q_x q_w^T exactly in int32 (`torch._int_mm`), then the
    token and channel scales, as the W8A8 kernel computes it (Gemma 3 270M, 512 tokens: 2-5x faster than the
    float32 product of the dequantized operands, which agrees to float32 rounding)."""
    q, sx = int8_activations(x, static)                                  # (n, C) int8, (n, 1) float32
    wq = (qw.codes ^ 0x80).view(torch.int8)                              # codes - 128: symmetric int8 values
    acc = torch._int_mm(q, wq.t())                                       # (n, rows) int32
    return float(acc.float().mul_(sx).mul_(qw.scales[:, 0].float()).sub_(ref).pow_(2).mean())


@torch.no_grad()
def choose_alpha(site: Site, weights: list[Tensor], scheme: QuantScheme, grid: tuple[float, ...]
                 ) -> tuple[float | None, dict[float | None, float]]:
    """The α (None: no smoothing) of least simulated error on the site's token sample, and every score."""
    x = site.x
    w = torch.cat([t.detach().float() for t in weights])                  # (rows, C)
    ref = x @ w.t()
    errors: dict[float | None, float] = {None: simulated_error(x, site.amax, w, ref, None, scheme)}
    for alpha in grid:
        errors[alpha] = simulated_error(x, site.amax, w, ref, smoothing_scale(site.amax, weights, alpha), scheme)
    best = min(errors, key=lambda a: (errors[a], -1.0 if a is None else a))
    return best, errors


@torch.no_grad()
def smooth_block(calib: BlockCalib, spec: ArchSpec, targets: set[str], scheme: QuantScheme,
                 cfg: SmoothConfig) -> dict[str, float | None]:
    """Smooth one block in place (names in `targets` relative to it); returns the α folded per mapping (by its
    previous op; None: left unsmoothed)."""
    block = calib.block
    mappings = usable_mappings(block, spec, targets)
    if not mappings:
        return {}
    t0 = time.perf_counter()
    sites = collect(calib, mappings, cfg.score_tokens, cfg.seed)
    chosen: dict[str, float | None] = {}
    notes = []
    for m in mappings:
        site = sites[_input_site(m)]
        weights = [calib.master(block.get_submodule(n)) for n in m.linears]  # float32 (the block may compute in bf16)
        if cfg.alpha is not None:
            alpha: float | None = cfg.alpha
        else:
            alpha, errors = choose_alpha(site, weights, scheme, cfg.grid)
            notes.append(f"{m.prev} {'off' if alpha is None else f'{alpha:.2f}'} "
                         f"({errors[alpha]:.3g} vs {errors[None]:.3g})")
        chosen[m.prev] = alpha
        if alpha is not None:
            s = smoothing_scale(site.amax.to(weights[0].device), weights, alpha)
            calib.edit_float(lambda b, m=m, s=s: fold_scale(b, m.prev, m.linears, s, m.norm_offset, m.compensate))
    log.info("smooth block %d in %.1fs: %s", calib.index, time.perf_counter() - t0,
             "; ".join(notes) or f"alpha {cfg.alpha}")
    return chosen
