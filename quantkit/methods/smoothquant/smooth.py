"""SmoothQuant's smoothing on one decoder block (Xiao et al. 2023), with α chosen by measurement.

For each of the architecture's mappings (previous op -> the Linears it feeds; the same table AWQ folds
into), with per-input-channel maxima a_j = max |x_j| over the calibration tokens and w_j = max |W_:,j|
over the mapping's Linears, the smoothing scale is

    s_j = a_j^α / w_j^(1-α)        (clamped to >= 1e-5, as llm-compressor does)

and x / s, W * s are folded exactly into the previous op and the Linears (`quantkit.methods.scaling`).

α is not a constant: every candidate α (and "no smoothing") is folded into the block in turn, its Linears
simulated on the scheme's grid (RTN weights, and input activations quantized as the scheme says), and the
block's output compared with the float block's on the first calibration batches; the smallest mean
squared error wins, per block. A fixed α (the `smooth_alpha` option) skips the search.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantkit.calib.hooks import HookSet
from quantkit.calib.pipeline import BlockCalib, StopForward
from quantkit.grid import quantize_activations, quantize_weight
from quantkit.methods.scaling import fold_scale, usable_mappings
from quantkit.models.arch import ArchSpec, AWQMapping
from quantkit.scheme import QuantScheme

log = logging.getLogger(__name__)

MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float | None      # fixed migration strength; None: search `grid`
    grid: tuple[float, ...]  # candidate α values (no smoothing is always a candidate too)
    score_batches: int       # calibration batches the block's output error is measured on


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


@torch.no_grad()
def collect(calib: BlockCalib, mappings: list[AWQMapping], n_keep: int) -> tuple[dict[str, Tensor], list[Tensor]]:
    """One float pass: each mapping's per-channel input maxima, and the block's outputs on the first n_keep batches."""
    maxima: dict[str, Tensor] = {}
    outputs: list[Tensor] = []

    def site_hook(name: str):
        def hook(_mod, args):
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
        return hook

    def keep(_mod, _args, out):
        if calib.batch < n_keep:
            outputs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())

    def install(hs: HookSet) -> None:
        for site in {_input_site(m) for m in mappings}:
            hs.pre(calib.block.get_submodule(site), site_hook(site))
        hs.forward(calib.block, keep)

    calib.forward(hooks=install)
    return maxima, outputs


class Simulated:
    """While active: the block's target Linears compute with RTN weights on the scheme's grid and quantize their
    inputs as the scheme's activations say (dynamic per token; static per tensor, approximated by each batch's max)."""

    def __init__(self, block: nn.Module, targets: list[str], scheme: QuantScheme):
        self.block, self.targets, self.scheme = block, targets, scheme

    def __enter__(self) -> "Simulated":
        s = self.scheme
        self.saved = {}
        for n in self.targets:
            lin = self.block.get_submodule(n)
            self.saved[n] = lin.weight.data
            qw = quantize_weight(lin.weight.data, s.bits, s.group_size, s.sym, s.type, s.weight_strategy == "tensor")
            lin.weight.data = qw.dequantize(lin.weight.dtype)
        self.hooks = HookSet()
        act = s.input_activations
        if act is not None:
            for n in self.targets:
                self.hooks.pre(self.block.get_submodule(n), self._quantize_input(act.type, act.dynamic, act.qmax))
        return self

    @staticmethod
    def _quantize_input(number: str, dynamic: bool, qmax: float):
        def hook(_mod, args):
            x = args[0]
            scale = None if dynamic else (x.abs().amax() / qmax).clamp(min=1e-8).reshape(1)
            return (quantize_activations(x, number, scale), *args[1:])
        return hook

    def __exit__(self, *exc) -> None:
        self.hooks.remove()
        for n, w in self.saved.items():
            self.block.get_submodule(n).weight.data = w


@torch.no_grad()
def block_error(calib: BlockCalib, targets: list[str], scheme: QuantScheme, reference: list[Tensor]) -> float:
    """Mean squared error of the simulated block's outputs against `reference` (its first batches)."""
    sse, n = 0.0, 0
    stop = len(reference)

    def install(hs: HookSet) -> None:
        def pre(_mod, _args):
            if calib.batch >= stop:
                raise StopForward
        hs.pre(calib.block, pre)

        def post(_mod, _args, out):
            nonlocal sse, n
            y = out[0] if isinstance(out, (tuple, list)) else out
            d = (y.float() - reference[calib.batch].float())
            sse += float(d.pow(2).sum())
            n += d.numel()
        hs.forward(calib.block, post)

    with Simulated(calib.block, targets, scheme):
        calib.forward(hooks=install)
    return sse / max(n, 1)


class _Folded:
    """Fold a set of scales into the block for as long as the context lasts (restored bit for bit after)."""

    def __init__(self, block: nn.Module, mappings: list[AWQMapping], scales: dict[str, Tensor]):
        self.block, self.mappings, self.scales = block, mappings, scales

    def __enter__(self) -> None:
        self.saved: dict[str, tuple[Tensor, Tensor | None]] = {}
        for m in self.mappings:
            for name in (m.prev, *m.linears, *m.compensate):
                mod = self.block.get_submodule(name)
                bias = getattr(mod, "bias", None)
                self.saved.setdefault(name, (mod.weight.data, bias.data if isinstance(bias, Tensor) else None))
        for m in self.mappings:
            fold_scale(self.block, m.prev, m.linears, self.scales[m.prev], m.norm_offset, m.compensate)

    def __exit__(self, *exc) -> None:
        for name, (w, b) in self.saved.items():
            mod = self.block.get_submodule(name)
            mod.weight.data = w
            if b is not None:
                mod.bias.data = b


def scales_for(block: nn.Module, mappings: list[AWQMapping], maxima: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    out = {}
    for m in mappings:
        weights = [block.get_submodule(n).weight for n in m.linears]
        out[m.prev] = smoothing_scale(maxima[_input_site(m)].to(weights[0].device), weights, alpha).to(weights[0].dtype)
    return out


@torch.no_grad()
def smooth_block(calib: BlockCalib, spec: ArchSpec, targets: set[str], scheme: QuantScheme,
                 cfg: SmoothConfig) -> float | None:
    """Smooth one block in place (names in `targets` relative to it); returns the α folded (None: no smoothing)."""
    block = calib.block
    mappings = usable_mappings(block, spec, targets)
    if not mappings:
        return None
    t0 = time.perf_counter()
    search = cfg.alpha is None
    maxima, reference = collect(calib, mappings, cfg.score_batches if search else 0)
    if not search:
        best: float | None = cfg.alpha
    else:
        names = sorted(targets)
        errors: dict[float | None, float] = {None: block_error(calib, names, scheme, reference)}
        for alpha in cfg.grid:
            with _Folded(block, mappings, scales_for(block, mappings, maxima, alpha)):
                errors[alpha] = block_error(calib, names, scheme, reference)
        best = min(errors, key=lambda a: (errors[a], -1 if a is None else a))
        log.info("smooth block %d: alpha %s (output MSE %.4g; unsmoothed %.4g) in %.1fs", calib.index,
                 "off" if best is None else f"{best:.2f}", errors[best], errors[None], time.perf_counter() - t0)
    if best is not None:
        for m, s in zip(mappings, scales_for(block, mappings, maxima, best).values()):
            fold_scale(block, m.prev, m.linears, s, m.norm_offset, m.compensate)
    return best
