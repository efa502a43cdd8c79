"""GPTQ on one decoder block: the step the calibration pipeline runs per block.

In true-sequential order (attention inputs, o_proj, MLP inputs, down_proj): run the
calibration batches through the block only as far as the group's first Linear, streaming
XᵀX into one Hessian per group (the group's Linears share their input), quantize the
group's row-stacked weights in one GPTQ call, and write the dequantized weights back so
the next group and the next block see the quantized model.

Mixture-of-experts blocks: each expert's gate/up (then down) is its own group, and
the groups of all experts form one stage collected in a single pass; an expert's
Hessian holds only the tokens routed to it (or all, with --moe-calibration all).
An expert that saw fewer than --moe-min-tokens is quantized with RTN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantkit.calib.hooks import HookSet
from quantkit.calib.pipeline import BlockCalib, StopForward
from quantkit.calib.shortcut import Shortcut
from quantkit.grid import QuantizedWeight, quantize_weight
from quantkit.methods.gptq.algorithm import GPTQParams, HessianAccumulator, gptq_quantize, split_rows
from quantkit.methods.gptq.float_target import FloatTargetStats, Targeted, float_group_inputs, float_target
from quantkit.models.arch import ArchSpec, block_stages, expert_of
from quantkit.models.moe import ExpertCoverage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Group:
    names: tuple[str, ...]          # relative to the block, in the spec's order
    modules: tuple[nn.Linear, ...]
    stage: int = 0                  # groups of one stage have independent inputs: one pass collects them all
    expert: str | None = None       # the MoE expert they belong to ("mlp.experts.5"), relative to the block


def block_groups(block: nn.Module, spec: ArchSpec, keep: set[str]) -> list[_Group]:
    """The block's Linear groups in execution order, restricted to the relative names in `keep`."""
    groups = []
    for k, stage in enumerate(block_stages(block, spec)):
        for names in stage:
            found = []
            for n in names:
                if n not in keep:
                    continue
                mod = block.get_submodule(n)
                if isinstance(mod, nn.Linear):
                    found.append((n, mod))
            if found:
                groups.append(_Group(tuple(n for n, _ in found), tuple(m for _, m in found), k,
                                     expert_of(spec, found[0][0])))
    return groups


def _stages(groups: list[_Group]) -> list[list[_Group]]:
    out: list[list[_Group]] = []
    for g in groups:
        if out and out[-1][0].stage == g.stage:
            out[-1].append(g)
        else:
            out.append([g])
    return out


Accumulator = Callable[[BlockCalib, "_Group"], Any]  # a group's input statistics (`collect_hessians`)


def group_hessian(calib: BlockCalib, group: _Group, track_absmax: bool = False,
                  low_precision_products: bool = False) -> HessianAccumulator:
    """The plain statistics of a group's inputs: XᵀX (and max |x| with `track_absmax`)."""
    return HessianAccumulator(group.modules[0].in_features, calib.device, track_absmax=track_absmax,
                              low_precision_products=low_precision_products)


@dataclass
class Replay:
    """A submodule and the (args, kwargs) it received per batch: rerun it alone for the next group."""

    module: nn.Module
    inputs: list[tuple[tuple, dict[str, Any]]]


def collect_hessians(calib: BlockCalib, groups: list[_Group], stop_after_last: bool = True,
                     replay: Replay | None = None, capture: str | None = None,
                     tokens: list[int] | None = None,
                     shortcut: Shortcut | None = None,
                     absmax: list[float] | None = None,
                     low_precision_products: bool = False,
                     accumulator: Accumulator | None = None) -> tuple[list[Any], Replay | None]:
    """One pass over the calibration batches; returns H (in, in) per group, and the capture.

    Only each group's first Linear is hooked: the others read the same tensor. The pass
    stops after the last group's input is seen (nothing past it is needed).
    `replay`: run only that submodule on its recorded inputs instead of the whole block.
    `capture`: record the inputs of that submodule (relative name) during this pass, for
    the next group's replay.
    `tokens`: filled with the token count per group; a group no token reached (an MoE expert
    the router never chose) then gets an all-zero H instead of an error.
    `shortcut`: records the (single) group Linear's inputs, and checks on the first batch that its
    parent's output is that Linear's (the batch then runs on to the parent's end).
    `absmax`: filled with the largest |x| each group's input reached (static activation scales).
    `low_precision_products`: XᵀX tiles computed in the block's 16-bit compute dtype, summed in float32
    (`HessianAccumulator`).
    `accumulator(calib, group)`: each group's statistics instead of a `HessianAccumulator` (e.g. of its inputs'
    8-bit quantization, `grid.input_stats`); its `hessian()` is what the group quantizer receives.
    """
    accs = [accumulator(calib, g) if accumulator is not None else
            group_hessian(calib, g, absmax is not None, low_precision_products) for g in groups]
    recorded: list[tuple[tuple, dict[str, Any]]] = []

    def hook_for(k: int):
        def pre(_mod, args):
            accs[k].add(args[0].detach())
            if shortcut is not None:
                shortcut.record(args[0])
                if not shortcut.checked:
                    return  # the parent's forward hook compares its output, then stops the batch
            if stop_after_last and k == len(groups) - 1:
                raise StopForward
        return pre

    def record(_mod, args, kwargs):
        recorded.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                         {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))

    def install(hs: HookSet) -> None:
        if capture is not None:
            hs.pre(calib.block.get_submodule(capture), record, with_kwargs=True)
        for k, g in enumerate(groups):
            hs.pre(g.modules[0], hook_for(k))
        if shortcut is not None:
            shortcut.install_check(hs)

    if replay is None:
        calib.forward(hooks=install)
    else:
        with HookSet() as hs, torch.no_grad():
            install(hs)
            for i, (args, kwargs) in enumerate(replay.inputs):
                calib.batch = i
                try:
                    replay.module(*args, **kwargs)
                except StopForward:
                    pass
    captured = Replay(calib.block.get_submodule(capture), recorded) if capture else None
    if absmax is not None:
        absmax[:] = [float(a.absmax) for a in accs]
    if tokens is not None:
        tokens[:] = [a.tokens for a in accs]
        return [a.hessian() if a.tokens else a.sum for a in accs], captured
    return [a.hessian() for a in accs], captured


def replay_parent(prev: _Group | list[_Group], nxt: _Group | list[_Group]) -> str | None:
    """The innermost submodule holding both groups (e.g. "mlp" for gate/up -> down), or None if only the block does.

    Its inputs are computed before `prev` runs, so they stay valid after `prev` is quantized.
    Stages (lists of groups) count by all their groups ("mlp.experts" for experts' gate/up -> down).
    """
    groups = [*(prev if isinstance(prev, list) else [prev]), *(nxt if isinstance(nxt, list) else [nxt])]
    names = [g.names[0] for g in groups]
    common = names[0].split(".")[:-1]
    for n in names[1:]:
        parts = n.split(".")[:-1]
        k = 0
        while k < min(len(common), len(parts)) and common[k] == parts[k]:
            k += 1
        common = common[:k]
    return ".".join(common) or None


ParamsOf = Callable[[str], GPTQParams]  # relative Linear name -> its GPTQ parameters (per-module grids)


def rtn_group(calib: BlockCalib, group: _Group, params: GPTQParams,
              params_of: ParamsOf | None = None) -> dict[str, QuantizedWeight]:
    """Round-to-nearest for a group calibration could not serve (an MoE expert too few tokens reached)."""
    out = {}
    for name, mod in zip(group.names, group.modules, strict=True):
        if params_of is not None:
            params = params_of(name)
        qw = quantize_weight(calib.master(mod), params.bits, params.group_size, params.sym, params.number,
                             params.per_tensor, mod.bias, params.observer)
        mod.weight.data.copy_(qw.dequantize(mod.weight.dtype))
        out[name] = qw.cpu()
    return out


def quantize_group(calib: BlockCalib, group: _Group, h: torch.Tensor, params: GPTQParams,
                   params_of: ParamsOf | None = None) -> dict[str, QuantizedWeight]:
    """GPTQ on the group's row-stacked weights; writes the dequantized weights back in place.

    `params_of`: the Linears' own grids; those of one grid are stacked together. GPTQ treats rows
    independently given H, so splitting the stack by grid changes nothing but each part's grid.
    `h` a `Targeted` (`float_target`): round towards the float model's outputs, with its quantized inputs' Hessian."""
    if params_of is not None:
        by_grid: dict[GPTQParams, list[int]] = {}
        for k, name in enumerate(group.names):
            by_grid.setdefault(params_of(name), []).append(k)
        if len(by_grid) > 1 or next(iter(by_grid)) != params:
            out: dict[str, QuantizedWeight] = {}
            for p, ks in by_grid.items():
                part = _Group(tuple(group.names[k] for k in ks), tuple(group.modules[k] for k in ks),
                              group.stage, group.expert)
                out.update(quantize_group(calib, part, h, p))
            return {n: out[n] for n in group.names}
    weights = [calib.master(m) for m in group.modules]
    stacked = torch.cat(weights, dim=0) if len(weights) > 1 else weights[0]
    if isinstance(h, Targeted):
        stacked, h = float_target(stacked, h.h, h.cross, params.damp), h.h
    res = gptq_quantize(stacked, h, params)
    parts = split_rows(res.weight, [w.shape[0] for w in weights], [m.bias for m in group.modules])
    out = {}
    for name, mod, qw in zip(group.names, group.modules, parts, strict=True):
        mod.weight.data.copy_(qw.dequantize(mod.weight.dtype))
        out[name] = qw.cpu()
    log.debug("gptq %s: loss %.4g damp %.3g%s", ",".join(group.names), res.loss, res.damp,
              " (RTN fallback)" if res.fallback else "")
    return out


def gptq_block(calib: BlockCalib, spec: ArchSpec, targets: set[str], params: GPTQParams,
               true_sequential: bool, replay: bool = True,
               coverage: ExpertCoverage | None = None, shortcuts: bool = True,
               input_qmax: float | None = None, quantize: Any = None,
               low_precision_products: bool = False,
               params_of: ParamsOf | None = None, to_float: bool = False,
               accumulator: Accumulator | None = None) -> dict[str, Any]:
    """Quantize one block's target Linears (`targets`: full names); returns relative name -> weight.

    `coverage`: MoE expert policy and record (default: routed, 16 tokens at least).
    `shortcuts`: once a submodule's last Linear is quantized (o_proj), later passes replace the submodule by
    that Linear on its recorded inputs (quantkit.calib.shortcut; checked exact on the first batch) and this
    function computes the next block's inputs itself. The codes are the same either way.
    `input_qmax`: static activation scheme: each Linear records input_scale = max|x| / input_qmax (fp16-rounded)
    of the inputs it saw (the quantized model's, in true-sequential order).
    `low_precision_products`: Hessian products in the block's compute dtype (`collect_hessians`).
    `quantize(calib, group, h)`: the group quantizer instead of `quantize_group` (e.g. onto GGUF's blocks,
    `quantkit.methods.gptq.grid.grid_group`); it writes the group's quantized weights back as well.
    `params_of`: each Linear's parameters (relative name), where the scheme gives Linears their own grids.
    `to_float`: round each group towards the float block's outputs on the float model's inputs
    (`calib.reference_inputs`; `quantkit.methods.gptq.float_target`), not towards W on the quantized inputs.
    `accumulator`: each group's input statistics instead of its Hessian (`collect_hessians`), for `quantize`.
    """
    prefix = f"{spec.blocks}.{calib.index}."
    keep = {n.removeprefix(prefix) for n in targets if n.startswith(prefix)}
    groups = block_groups(calib.block, spec, keep)
    results: dict[str, QuantizedWeight] = {}
    if not groups:
        return results
    coverage = coverage or ExpertCoverage()
    if to_float:
        if calib.reference_inputs is None or quantize is not None or any(g.expert is not None for g in groups):
            raise ValueError("float_target needs the float reference stream, the scheme's own grid and no MoE experts")
        caps = float_group_inputs(calib.block, [g.modules[0] for g in groups], calib.reference_inputs, calib.args,
                                  calib.block_kwargs, calib.device, calib.dtype, calib.store_device)
        floats = {id(g): c for g, c in zip(groups, caps, strict=True)}

        def accumulator(calib: BlockCalib, g: _Group) -> FloatTargetStats:
            acc = group_hessian(calib, g, input_qmax is not None, low_precision_products)
            return FloatTargetStats(calib, floats.pop(id(g)), acc)

    def finish(stage: list[_Group], hs: list[Any], tokens: list[int], amax: list[float] | None) -> None:
        for g, h, n, m in zip(stage, hs, tokens, amax or [0.0] * len(stage), strict=True):
            if g.expert is not None and not coverage.enough(prefix + g.expert, n):
                done = rtn_group(calib, g, params, params_of)
            elif quantize is not None:
                done = quantize(calib, g, h)
            else:
                done = quantize_group(calib, g, h, params, params_of)
            if input_qmax is not None:
                scale = torch.tensor([max(m, 1e-6) / input_qmax], dtype=torch.float32).half().float()
                for qw in done.values():
                    qw.input_scale = scale.clone()
            results.update(done)

    t0 = time.perf_counter()
    done: list[Shortcut] = []  # submodules whose last Linear is quantized: later passes skip them
    with coverage.statistics(calib.block):
        if true_sequential:
            previous: Replay | None = None
            stages = _stages(groups)
            for k, st in enumerate(stages):
                nxt = replay_parent(st, stages[k + 1]) if replay and k + 1 < len(stages) else None
                tokens: list[int] = []
                amax: list[float] | None = [] if input_qmax is not None else None
                sc = (Shortcut.find(calib, st[0].names)
                      if shortcuts and len(st) == 1 and st[0].expert is None else None)
                with ExitStack() as stack:
                    for d in done:
                        stack.enter_context(d.standing_in())
                    hs, previous = collect_hessians(calib, st, replay=previous, capture=nxt, tokens=tokens,
                                                    shortcut=sc, absmax=amax,
                                                    low_precision_products=low_precision_products,
                                                    accumulator=accumulator)
                finish(st, hs, tokens, amax)
                del hs
                if sc is not None and sc.valid:
                    done.append(sc)
            if done:  # the next block's inputs, with attention replaced where its outputs are known
                with ExitStack() as stack:
                    for d in done:
                        stack.enter_context(d.standing_in())
                    calib.next_inputs = calib.forward(keep_outputs=True)
        else:
            tokens, amax = [], ([] if input_qmax is not None else None)
            hs, _ = collect_hessians(calib, groups, tokens=tokens, absmax=amax,
                                     low_precision_products=low_precision_products, accumulator=accumulator)
            finish(groups, hs, tokens, amax)
    log.info("gptq block %d: %d Linears in %.1fs", calib.index, len(results), time.perf_counter() - t0)
    return results
