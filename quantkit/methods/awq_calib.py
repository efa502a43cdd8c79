"""AWQ over the sequential calibration pipeline: per-block statistics, alpha-grid evaluators, and
the block routine that searches, folds, clips and quantizes (see `quantkit.methods.awq`).

One pass of the float block over every calibration batch records, per input site (the first
Linear of each group sharing an input): sum |x|, the per-group Gram matrices (for clipping) and
a seeded token subsample; and, for attention modules, their full call inputs (args and kwargs,
rotary tables included) for the first sequences. Scoring an alpha then runs only the inspected
module on those cached inputs, never the whole block.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calib.hooks import HookSet
from quantkit.calib.pipeline import BlockCalib, BlockSource, BlockStore, Progress, StopForward, run_sequential
from quantkit.grid import QuantizedWeight, rtn_quantize
from quantkit.methods.awq import (
    _CHUNK_ELEMENTS,
    AWQConfig,
    AWQSearch,
    Evaluator,
    _relative,
    apply_block,
    best_scale,
    clip_eligible,
    group_view,
    mixes_tokens,
    search_clip,
    usable_mappings,
)
from quantkit.models.arch import ArchSpec, block_linears, block_stages, expert_of, get_arch, get_blocks
from quantkit.models.moe import ExpertCoverage

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
    if isinstance(obj, Tensor):
        return obj[rows].clone() if obj.dim() >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_select(o, rows, batch) for o in obj)
    if isinstance(obj, list):
        return [_select(o, rows, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _select(v, rows, batch) for k, v in obj.items()}
    return obj


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


# ---------------------------------------------------------------- one block


@dataclass
class ModuleResult:
    """What the search decided for one module of a block (any field may be unset)."""

    quantized: QuantizedWeight | None = None
    scale: Tensor | None = None   # this module is a previous op: its output was divided by this
    clip: Tensor | None = None    # this Linear's weights were clipped to these maxima


def _sites(block: nn.Module, linears: dict[str, nn.Linear], spec: ArchSpec) -> dict[str, str]:
    """Linear name -> the first Linear of its sequential group (they all read the same input)."""
    site_of = {}
    for stage in block_stages(block, spec):
        for group in stage:
            present = [n for n in group if n in linears]
            for n in present:
                site_of[n] = present[0]
    return site_of


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(codes=qw.codes.cpu(), scales=qw.scales.cpu(), zeros=qw.zeros.cpu(), g_idx=qw.g_idx.cpu(),
                           bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
                           bias=None if qw.bias is None else qw.bias.cpu())


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


@torch.no_grad()
def awq_block(calib: BlockCalib, spec: ArchSpec, targets: set[str], cfg: AWQConfig,
              coverage: ExpertCoverage | None = None) -> dict[str, ModuleResult]:
    """Search, fold, clip and quantize one block; `targets` are Linear names relative to it.

    Leaves the block computing with the dequantized weights, as the pipeline requires.
    MoE (`coverage`: expert policy and record): an expert too few tokens reached gets no search of
    its own (no up -> down scale, no clipping), only the norm's shared scale, then RTN.
    """
    block = calib.block
    linears = block_linears(block, spec)
    names = [n for n in linears if n in targets]
    if not names:
        return {}
    mappings = usable_mappings(block, spec, set(names))
    site_of = _sites(block, linears, spec)
    gram_sites = {site_of[n] for n in names if clip_eligible(n)}
    input_of = {m.prev: m.input or site_of[m.linears[0]] for m in mappings}  # whose input gives x_mean
    sites = {n: linears[n].in_features for n in gram_sites}
    sites.update({input_of[m.prev]: linears[m.linears[0]].in_features for m in mappings})
    attn_inputs: dict[str, list] = {m.inspect: [] for m in mappings
                                    if mixes_tokens(m.inspect, block.get_submodule(m.inspect))}
    t0 = time.perf_counter()
    coverage = coverage or ExpertCoverage()
    with coverage.statistics(block):
        stats = collect_stats(calib, linears, sites, gram_sites, attn_inputs, cfg)
    t_stats = time.perf_counter()
    expert_tokens: dict[str, int] = {}  # each expert's first input: the tokens routed to it
    for n in names:
        if (e := expert_of(spec, n)) is not None:
            expert_tokens.setdefault(e, stats[site_of[n]].tokens if site_of[n] in stats else 0)
    fallback = coverage.starved(f"{spec.blocks}.{calib.index}.", expert_tokens)
    mappings = [m for m in mappings if expert_of(spec, m.prev) not in fallback]

    # 1. scales: every mapping is searched on the float block, then all are folded (as AutoAWQ does)
    scales: dict[str, Tensor] = {}
    for m in mappings:
        lins = [linears[n] for n in m.linears]
        st = stats[input_of[m.prev]]
        inspect = block.get_submodule(m.inspect)
        evaluate: Evaluator
        if m.inspect in attn_inputs:
            evaluate = ModuleEvaluator(inspect, lins, attn_inputs[m.inspect])
        elif m.linears == (m.inspect,):
            evaluate = LinearEvaluator(st.samples(), lins[0].weight.data.float())
        else:  # a token-wise module (MLP) fed by the Linears' input: run it on the token subsample
            x = st.samples().to(lins[0].weight.dtype)
            chunks = x.chunk(min(SCREEN_FRACTION, x.shape[0]))
            evaluate = ModuleEvaluator(inspect, lins, [((c[None],), {}) for c in chunks])
        choice = best_scale(st.x_mean, [lin.weight.data.float() for lin in lins], evaluate, cfg)
        scales[m.prev] = choice.scale
        log.debug("awq block %d %s: alpha %.2f loss %.4g (alpha 0: %.4g)", calib.index, m.prev,
                  choice.index / cfg.n_grid, choice.losses[choice.index], choice.losses.get(0, float("nan")))
    attn_inputs.clear()
    t_scales = time.perf_counter()
    apply_block(block, spec, set(names), scales, {}, cfg.group_size)

    # 2. clipping, scored with the Gram matrices of the now scaled inputs x / s
    input_scale = {n: scales[m.prev] for m in mappings for n in m.linears}
    clips: dict[str, Tensor] = {}
    for n in names:
        gram = stats[site_of[n]].gram
        if not clip_eligible(n) or gram is None or expert_of(spec, n) in fallback:
            continue
        if n in input_scale:
            sg = group_view(input_scale[n][None], cfg.group_size)[0]  # (G, gs)
            gram = gram / (sg[:, :, None] * sg[:, None, :])
        clips[n] = search_clip(linears[n].weight.data, gram, cfg)
    apply_block(block, spec, set(names), {}, clips, cfg.group_size)

    # 3. quantize on the scheme's grid; the block now computes with the dequantized weights
    out: dict[str, ModuleResult] = {}
    for n in names:
        lin = linears[n]
        qw = rtn_quantize(lin.weight.data, cfg.bits, cfg.group_size, cfg.sym, lin.bias)
        lin.weight.data = qw.dequantize(lin.weight.dtype)
        out[n] = ModuleResult(quantized=_to_cpu(qw), clip=None if n not in clips else clips[n].cpu())
    for prev, s in scales.items():
        out.setdefault(prev, ModuleResult()).scale = s.cpu()
    log.debug("awq block %d: stats %.1fs, scale search %.1fs, clip+quantize %.1fs", calib.index,
              t_stats - t0, t_scales - t_stats, time.perf_counter() - t_scales)
    return out


SCALE, CLIP = ":awq_scale", ":awq_clip"  # side-result keys: module name + suffix


def _flat(results: dict[str, ModuleResult]) -> dict[str, Any]:
    """A block's results as the pipeline's store takes them: codes to the checkpoint, scales and clips kept."""
    out: dict[str, Any] = {}
    for name, r in results.items():
        if r.quantized is not None:
            out[name] = r.quantized
        if r.scale is not None:
            out[name + SCALE] = r.scale
        if r.clip is not None:
            out[name + CLIP] = r.clip
    return out


def run_awq(model: nn.Module, samples: Tensor, cfg: AWQConfig, targets: set[str] | None = None, *,
            device: torch.device, batch_size: int = 8, blocks: BlockSource | None = None,
            store: BlockStore | None = None,
            progress: Progress | None = None,
            coverage: ExpertCoverage | None = None) -> tuple[AWQSearch, dict[str, QuantizedWeight]]:
    """AWQ over every block: (the search result, the quantized target Linears by full name)."""
    spec = get_arch(model)
    if targets is None:
        targets = {f"{spec.blocks}.{i}.{n}" for i, b in enumerate(get_blocks(model, spec)) for n in block_linears(b, spec)}

    cov = coverage or ExpertCoverage()

    def per_block(calib: BlockCalib) -> dict[str, Any]:  # + the block's MoE token counts (kept on resume)
        done = _flat(awq_block(calib, spec, _relative(targets, spec, calib.index), cfg, cov))
        return {**done, **cov.block_results(f"{spec.blocks}.{calib.index}.")}

    results = cov.absorb(run_sequential(model, spec, samples, per_block, device=device, batch_size=batch_size,
                                        blocks=blocks, progress=progress, store=store))
    search, quantized = AWQSearch(meta=cfg.meta()), {}
    for name, r in results.items():  # with a store, the codes are on disk: only scales and clips come back
        if name.endswith(SCALE):
            search.scales[name.removesuffix(SCALE)] = r
        elif name.endswith(CLIP):
            search.clips[name.removesuffix(CLIP)] = r
        else:
            quantized[name] = r
    return search, quantized
