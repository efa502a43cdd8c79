"""RTN's registered step (`quantkit.methods.steps`): round a block's Linears to nearest on the scheme's grid (any grid
quantkit writes: integer groups, channels or tensor, or FP8), after whatever scaling step came before it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from quantkit.grid import quantize_weight
from quantkit.methods.base import QuantJob
from quantkit.methods.blockwise import BlockStep
from quantkit.methods.steps import Step
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage
from quantkit.plan import BlockWork, Geometry, Settings


class RoundingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def rtn_step(job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
    s = job.scheme

    def step(calib: Any, targets: set[str]) -> dict[str, Any]:
        out = {}
        for name in sorted(targets):
            lin = calib.block.get_submodule(name)
            g = s.grid_of(f"{spec.blocks}.{calib.index}.{name}")
            qw = quantize_weight(calib.master(lin), g.bits, g.group_size, s.sym, s.type,
                                 s.weight_strategy == "tensor", lin.bias, s.observer)
            lin.weight.data = qw.dequantize(lin.weight.dtype)  # the block computes with its quantized weights
            out[name] = qw.cpu()
        return out

    return step


def rtn_memory(geometry: Geometry, settings: Settings) -> BlockWork:
    return BlockWork()


ROUNDING = Step(name="rtn-rounding", Options=RoundingOptions, make=rtn_step, memory=rtn_memory, rounds=True)
