"""A toy quantization method, written as a third-party package would ship one: this file only.

`toy` rounds each Linear to nearest on the scheme's grid after clipping its groups to `shrink` x their
largest |w|, when that lowers the Linear's output error on the calibration inputs it records (else plain
round-to-nearest). It declares what it needs (calibration, its options, its memory in a block) and
contributes only the per-block step; the calibration pipeline gives it offload, resume, MoE coverage and
progress. tests/unit/test_plugin.py registers it through the `quantkit.methods` entry point.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from quantkit.calib.hooks import HookSet
from quantkit.grid import QuantizedWeight, rtn_quantize
from quantkit.methods.base import QuantJob
from quantkit.methods.blockwise import BlockStep, BlockwiseMethod, RunOptions
from quantkit.models.arch import ArchSpec, block_linears
from quantkit.models.moe import ExpertCoverage
from quantkit.plan import F32, BlockWork, Geometry, Settings

ROWS = 64  # calibration rows each Linear keeps per batch to score its clipping


class ToyOptions(RunOptions):
    shrink: float = Field(0.9, gt=0.0, le=1.0, description="clip each group to this fraction of its max |w|")


def clipped(w: Tensor, shrink: float, group_size: int) -> Tensor:
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    g = w.reshape(out_f, in_f // gs, gs)
    m = g.abs().amax(-1, keepdim=True) * shrink
    return torch.maximum(torch.minimum(g, m), -m).reshape(out_f, in_f)


def best_rounding(w: Tensor, x: Tensor, shrink: float, job: QuantJob, bias: Tensor | None) -> QuantizedWeight:
    """RTN of w or of w clipped, whichever gives the smaller output error on the inputs x (rows, in)."""
    s = job.scheme
    candidates = [rtn_quantize(c, s.bits, s.group_size, s.sym, bias) for c in (w, clipped(w, shrink, s.group_size))]
    errors = [float((x @ (q.dequantize() - w).t()).pow(2).sum()) for q in candidates]
    return candidates[errors.index(min(errors))]


def toy_block(calib: Any, spec: ArchSpec, targets: set[str], job: QuantJob) -> dict[str, QuantizedWeight]:
    linears: dict[str, nn.Linear] = {n: m for n, m in block_linears(calib.block, spec).items() if n in targets}
    seen: dict[str, list[Tensor]] = {n: [] for n in linears}

    def install(hs: HookSet) -> None:
        for n, lin in linears.items():
            hs.pre(lin, lambda _m, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1])[:ROWS]))

    calib.forward(hooks=install)
    out = {}
    for n, lin in linears.items():
        qw = best_rounding(calib.master(lin).float(), torch.cat(seen[n]).float(), job.options.shrink, job, lin.bias)
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype))  # the next block sees the quantized one
        out[n] = qw.cpu()
    return out


class Toy(BlockwiseMethod):
    name = "toy"
    description = "toy plugin: RTN, or RTN of clipped groups where calibration says it is better"
    formats = ("gptq",)
    Options: ClassVar[type[BaseModel]] = ToyOptions

    @classmethod
    def block_memory(cls, geometry: Geometry, settings: Settings) -> BlockWork:
        batches = -(-settings.nsamples // settings.batch_size)
        kept = batches * ROWS * sum(i for _, i in geometry.linears) * F32
        return BlockWork(work=kept, forward=kept, detail="toy: recorded input rows")

    def block_step(self, job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
        return lambda calib, targets: toy_block(calib, spec, targets, job)
