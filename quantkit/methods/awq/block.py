"""AWQ on one decoder block (search, fold, clip, quantize) and over every block (`run_awq`, `search_awq`).

See `quantkit.methods.awq.search` for the search itself and `quantkit.methods.awq.stats` for what one
pass of the block records.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calib.pipeline import BlockCalib, BlockSource, BlockStore, Progress, run_sequential
from quantkit.grid import QuantizedWeight, rtn_quantize
from quantkit.methods.awq.apply import AWQSearch, _relative, apply_block, usable_mappings
from quantkit.methods.awq.search import (AWQConfig, Evaluator, best_scale, clip_eligible, group_view, mixes_tokens,
                                         search_clip)
from quantkit.methods.awq.stats import SCREEN_FRACTION, LinearEvaluator, ModuleEvaluator, SiteStats, collect_stats
from quantkit.models.arch import ArchSpec, block_linears, block_stages, expert_of, get_arch, get_blocks
from quantkit.models.moe import ExpertCoverage

log = logging.getLogger(__name__)


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


@dataclass
class BlockScales:
    """The scale search of one block, folded into it: what clipping and quantization go on from."""

    names: list[str]                 # the block's target Linears (relative), in execution order
    linears: dict[str, nn.Linear]    # every Linear of the block
    scales: dict[str, Tensor]        # previous op -> the s divided out of it
    input_scale: dict[str, Tensor]   # Linear -> the s its input was divided by
    stats: dict[str, SiteStats]      # per input site
    site_of: dict[str, str]          # Linear -> its input site
    fallback: set[str]               # MoE experts too few tokens reached (no search of their own)


def _evaluator(block: nn.Module, m: Any, lins: list[nn.Linear], st: SiteStats,
               attn_inputs: dict[str, list]) -> Evaluator:
    inspect = block.get_submodule(m.inspect)
    if m.inspect in attn_inputs:
        return ModuleEvaluator(inspect, lins, attn_inputs[m.inspect])
    if m.linears == (m.inspect,):
        return LinearEvaluator(st.samples(), lins[0].weight.data.float())
    # a token-wise module (MLP) fed by the Linears' input: run it on the token subsample
    x = st.samples().to(lins[0].weight.dtype)
    chunks = x.chunk(min(SCREEN_FRACTION, x.shape[0]))
    return ModuleEvaluator(inspect, lins, [((c[None],), {}) for c in chunks])


@torch.no_grad()
def search_scales(calib: BlockCalib, spec: ArchSpec, targets: set[str], cfg: AWQConfig,
                  coverage: ExpertCoverage | None = None, grams: bool = True) -> BlockScales | None:
    """One statistics pass, then every mapping's scale searched on the float block and all folded (as AutoAWQ
    does); None when the block has no target. `grams`: also record the Gram matrices clipping needs.

    MoE (`coverage`: expert policy and record): an expert too few tokens reached gets no search of its own
    (no up -> down scale), only the norm's shared scale.
    """
    block = calib.block
    linears = block_linears(block, spec)
    names = [n for n in linears if n in targets]
    if not names:
        return None
    mappings = usable_mappings(block, spec, set(names))
    site_of = _sites(block, linears, spec)
    gram_sites = {site_of[n] for n in names if clip_eligible(n)} if grams else set()
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

    scales: dict[str, Tensor] = {}
    for m in mappings:
        lins = [linears[n] for n in m.linears]
        st = stats[input_of[m.prev]]
        evaluate = _evaluator(block, m, lins, st, attn_inputs)
        choice = best_scale(st.x_mean, [lin.weight.data.float() for lin in lins], evaluate, cfg)
        scales[m.prev] = choice.scale
        log.debug("awq block %d %s: alpha %.2f loss %.4g (alpha 0: %.4g)", calib.index, m.prev,
                  choice.index / cfg.n_grid, choice.losses[choice.index], choice.losses.get(0, float("nan")))
    attn_inputs.clear()
    apply_block(block, spec, set(names), scales, {}, cfg.group_size)
    log.debug("awq block %d: stats %.1fs, scale search %.1fs", calib.index, t_stats - t0, time.perf_counter() - t_stats)
    return BlockScales(names, linears, scales, {n: scales[m.prev] for m in mappings for n in m.linears},
                       stats, site_of, fallback)


def search_clips(found: BlockScales, spec: ArchSpec, cfg: AWQConfig) -> dict[str, Tensor]:
    """Clipping maxima per eligible Linear, scored with the Gram matrices of the scaled inputs x / s."""
    clips: dict[str, Tensor] = {}
    for n in found.names:
        gram = found.stats[found.site_of[n]].gram
        if not clip_eligible(n) or gram is None or expert_of(spec, n) in found.fallback:
            continue
        if n in found.input_scale:
            sg = group_view(found.input_scale[n][None], cfg.group_size)[0]  # (G, gs)
            gram = gram / (sg[:, :, None] * sg[:, None, :])
        clips[n] = search_clip(found.linears[n].weight.data, gram, cfg)
    return clips


@torch.no_grad()
def awq_block(calib: BlockCalib, spec: ArchSpec, targets: set[str], cfg: AWQConfig,
              coverage: ExpertCoverage | None = None) -> dict[str, ModuleResult]:
    """Search, fold, clip and quantize one block; `targets` are Linear names relative to it.

    Leaves the block computing with the dequantized weights, as the pipeline requires.
    MoE: an expert too few tokens reached gets no search of its own (no up -> down scale, no
    clipping), only the norm's shared scale, then RTN.
    """
    found = search_scales(calib, spec, targets, cfg, coverage)
    if found is None:
        return {}
    t0 = time.perf_counter()
    clips = search_clips(found, spec, cfg)
    apply_block(calib.block, spec, set(found.names), {}, clips, cfg.group_size)

    # quantize on the scheme's grid; the block now computes with the dequantized weights
    out: dict[str, ModuleResult] = {}
    for n in found.names:
        lin = found.linears[n]
        qw = rtn_quantize(lin.weight.data, cfg.bits, cfg.group_size, cfg.sym, lin.bias)
        lin.weight.data = qw.dequantize(lin.weight.dtype)
        out[n] = ModuleResult(quantized=qw.cpu(), clip=None if n not in clips else clips[n].cpu())
    for prev, s in found.scales.items():
        out.setdefault(prev, ModuleResult()).scale = s.cpu()
    log.debug("awq block %d: clip+quantize %.1fs", calib.index, time.perf_counter() - t0)
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
    return split_results(results, cfg)


def split_results(results: dict[str, Any], cfg: AWQConfig) -> tuple[AWQSearch, dict[str, QuantizedWeight]]:
    """A run's results as (the search: scales and clips, the quantized Linears by full name)."""
    search, quantized = AWQSearch(meta=cfg.meta()), {}
    for name, r in results.items():  # with a store, the codes are on disk: only scales and clips come back
        if name.endswith(SCALE):
            search.scales[name.removesuffix(SCALE)] = r
        elif name.endswith(CLIP):
            search.clips[name.removesuffix(CLIP)] = r
        else:
            quantized[name] = r
    return search, quantized


def search_awq(model: nn.Module, samples: Tensor, cfg: AWQConfig, targets: set[str] | None = None, *,
               device: torch.device, batch_size: int = 8, blocks: BlockSource | None = None,
               progress: Progress | None = None) -> AWQSearch:
    """Search scales and clips block by block on `samples` (n, T) token ids.

    The model is left with the scales folded, the clips applied and the target Linears holding
    their dequantized weights (each block is calibrated on the quantized blocks before it).
    """
    return run_awq(model, samples, cfg, targets, device=device, batch_size=batch_size, blocks=blocks,
                   progress=progress)[0]
