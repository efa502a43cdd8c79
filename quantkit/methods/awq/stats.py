"""AWQ's calibration statistics and the evaluators that score candidate scales.

One pass of the float block over every calibration batch records, per input site (the first
Linear of each group sharing an input): sum |x|, the per-group Gram matrices (for clipping) and
a seeded token subsample; and, for attention modules, their full call inputs (args and kwargs,
rotary tables included) for the first sequences. Scoring an alpha then runs only the inspected
module on those cached inputs, never the whole block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from quantkit.calib.hooks import HookSet
from quantkit.calib.pipeline import BlockCalib, StopForward
from quantkit.compute import map_tensors
from quantkit.methods.awq.search import _CHUNK_ELEMENTS, AWQConfig, group_view

log = logging.getLogger(__name__)

SCORE_SHARE = 4  # the scoring sample is at most 1/SCORE_SHARE of the calibration tokens
_FULL_GRAM_MAX_GROUP = 128  # wider groups (per-channel) build their Gram matrix from the token subsample


# ---------------------------------------------------------------- evaluators


SCREEN_FRACTION = 4  # screening scores on 1/4 of the scoring sample


class LinearEvaluator:
    """The inspected module is the scaled Linear itself: loss = mean ||x (W_hat - W)^T||^2, batched."""

    def __init__(self, x: Tensor, w: Tensor):
        self.x, self.w = x, w
        self.screens = x.shape[0] >= SCREEN_FRACTION

    def __call__(self, w_hats: list[Tensor], screen: bool = False) -> Tensor:
        (wh,) = w_hats
        x = self.x[: self.x.shape[0] // SCREEN_FRACTION] if screen else self.x
        n, out_f = x.shape[0], self.w.shape[0]
        step = max(1, _CHUNK_ELEMENTS // (n * out_f))
        losses = [(x @ (part - self.w).transpose(1, 2)).pow(2).sum((1, 2)) for part in wh.split(step)]
        return torch.cat(losses).double() / (n * out_f)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class ModuleEvaluator:
    """Run `module` on recorded calls with each candidate's weights swapped into `linears`;
    loss = mean squared error against its float output. Screening uses the first quarter of the calls."""

    def __init__(self, module: nn.Module, linears: list[nn.Linear], calls: list[tuple[tuple, dict]]):
        self.module, self.linears, self.calls = module, linears, calls
        with torch.no_grad():
            self.targets = [_first(module(*a, **kw)) for a, kw in calls]
        self.screens = len(calls) >= SCREEN_FRACTION

    @torch.no_grad()
    def __call__(self, w_hats: list[Tensor], screen: bool = False) -> Tensor:
        n_calls = len(self.calls) // SCREEN_FRACTION if screen else len(self.calls)
        pairs = list(zip(self.calls, self.targets, strict=True))[:n_calls]
        numel = sum(t.numel() for _, t in pairs)
        originals = [lin.weight.data for lin in self.linears]
        losses = []
        try:
            for k in range(w_hats[0].shape[0]):
                for lin, wh in zip(self.linears, w_hats, strict=True):
                    lin.weight.data = wh[k].to(lin.weight.dtype)
                sse = sum(float((_first(self.module(*a, **kw)) - t).double().pow(2).sum()) for (a, kw), t in pairs)
                losses.append(sse / numel)
        finally:
            for lin, w in zip(self.linears, originals, strict=True):
                lin.weight.data = w
        return torch.tensor(losses, dtype=torch.float64)


# ---------------------------------------------------------------- calibration statistics


@dataclass
class SiteStats:
    """What one pass records about the input x of a group of Linears that share it."""

    abs_sum: Tensor                   # (in,) float64: sum |x| over tokens
    tokens: int = 0
    gram: Tensor | None = None        # (G, gs, gs) float32: sum x_g x_g^T per group, or None if not needed
    sample: list[Tensor] = field(default_factory=list)  # token subsample rows (n, in)

    @property
    def x_mean(self) -> Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def samples(self) -> Tensor:
        return torch.cat(self.sample)


def subsample_index(rows: int, k: int, seed: int, device: torch.device) -> Tensor:
    """k of `rows` token indices, sorted, drawn from a seeded CPU generator (deterministic)."""
    if k >= rows:
        return torch.arange(rows, device=device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(rows, generator=gen)[:k].sort().values.to(device)


def site_hook(stats: SiteStats, group_size: int, per_batch: int, seed: int, full_gram: bool,
              last: bool = False) -> Callable:
    """Forward pre-hook accumulating |x| sums, the group Gram matrices and a token subsample.
    `last`: nothing after this input is needed, so the batch's forward stops here."""
    batch_no = [0]

    def hook(_mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
        idx = subsample_index(x.shape[0], per_batch, seed + batch_no[0], x.device)
        batch_no[0] += 1
        stats.abs_sum += x.abs().sum(0).double()
        stats.tokens += x.shape[0]
        stats.sample.append(x[idx].clone())
        if stats.gram is not None:
            xs = x if full_gram else x[idx]  # wide groups: Gram from the subsample only
            xg = group_view(xs, group_size).transpose(0, 1)  # (G, tokens, gs)
            stats.gram += xg.transpose(1, 2) @ xg
        if last:
            raise StopForward

    return hook


def _select(obj, rows: slice, batch: int):
    """Sequences `rows` of a batch of module inputs: tensors whose dim 0 is the batch size are cut."""
    return map_tensors(obj, lambda t: t[rows].clone() if t.dim() >= 2 and t.shape[0] == batch else t)


def call_recorder(calls: list[tuple[tuple, dict]], max_tokens: int) -> Callable:
    """Forward pre-hook (with kwargs) keeping the inputs of the first whole sequences, one call per
    sequence, up to `max_tokens` tokens (at least one sequence)."""
    seen = [0]

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, seqlen = hidden.shape[0], hidden.shape[1]
        for j in range(batch):
            if seen[0] >= max_tokens:
                return
            seen[0] += seqlen
            calls.append((_select(tuple(args), slice(j, j + 1), batch), _select(dict(kwargs), slice(j, j + 1), batch)))

    return hook


def _first_linear_under(module_name: str, order: list[str]) -> str:
    """The first Linear (in execution order) inside `module_name`, or the last Linear if none is."""
    inside = [n for n in order if n.startswith(module_name + ".")]
    return inside[0] if inside else order[-1]


def score_budget(calib: BlockCalib, cfg: AWQConfig) -> int:
    """Tokens that score the alpha grid: cfg.score_tokens, but at most a quarter of the calibration
    tokens (small calibration sets stay cheap; 64 x 512 scores on 2048)."""
    first = next(calib.batches(), None)
    total = 0 if first is None else first.shape[0] * first.shape[1] * calib.n_batches
    return max(1, min(cfg.score_tokens, total // SCORE_SHARE))


def collect_stats(calib: BlockCalib, linears: dict[str, nn.Linear], sites: dict[str, int], gram_sites: set[str],
                  attn_inputs: dict[str, list], cfg: AWQConfig) -> dict[str, SiteStats]:
    """One pass of the (float) block over every calibration batch; see the module docstring.
    `sites`: module (a Linear, or an MoE block feeding its experts) -> its input width.
    With float propagation its outputs become the next block's inputs (`calib.next_inputs`)."""
    dev = calib.device
    budget = score_budget(calib, cfg)
    per_batch = math.ceil(budget / max(calib.n_batches, 1))
    seed = cfg.seed * 1_000_003 + calib.index * 10_007
    stats: dict[str, SiteStats] = {}
    for name, in_f in sites.items():
        gs = in_f if cfg.group_size == -1 else cfg.group_size
        gram = torch.zeros(in_f // gs, gs, gs, device=dev) if name in gram_sites else None
        stats[name] = SiteStats(abs_sum=torch.zeros(in_f, dtype=torch.float64, device=dev), gram=gram)

    order = list(linears)  # execution order (experts: all gate/up, then all down; each expert runs in turn)

    def position(name: str) -> int:
        return order.index(name if name in linears else _first_linear_under(name, order))

    last = max(sites, key=position)
    keep = cfg.propagate == "float"  # the float outputs feed the next block: run the whole block
    # otherwise stop at the last input needed, unless an attention module to record comes after it
    stop = not keep and all(order.index(last) > order.index(_first_linear_under(n, order)) for n in attn_inputs)

    def install(hs: HookSet) -> None:
        for name, st in stats.items():
            gs = sites[name] if cfg.group_size == -1 else cfg.group_size
            hook = site_hook(st, cfg.group_size, per_batch, seed, gs <= _FULL_GRAM_MAX_GROUP,
                             last=stop and name == last)
            hs.pre(calib.block.get_submodule(name), hook)
        for name, calls in attn_inputs.items():
            hs.pre(calib.block.get_submodule(name), call_recorder(calls, budget), with_kwargs=True)

    outputs = calib.forward(hooks=install, keep_outputs=keep)
    if keep:
        calib.next_inputs = outputs
    return stats
