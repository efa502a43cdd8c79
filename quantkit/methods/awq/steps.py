"""AWQ's registered step: the activation-aware scales of a block, searched on the float block and folded
exactly into the previous op (norm weights, v_proj rows), so that a later rounding step quantizes the scaled
weights and the checkpoint needs no scales of its own (`quantkit.methods.steps`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from quantkit.methods.awq.block import search_scales
from quantkit.methods.awq.memory import awq_block_memory
from quantkit.methods.awq.search import AWQConfig
from quantkit.methods.base import QuantJob
from quantkit.methods.blockwise import BlockStep
from quantkit.methods.steps import Step
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage


def scales_step(job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
    """Scales only (no clipping, no rounding); the statistics pass stops at the last input it needs and
    leaves the next block's inputs to the rounding step (they come from the quantized block)."""
    s = job.scheme
    cfg = AWQConfig(bits=s.bits, group_size=s.group_size, sym=s.sym, n_grid=job.options.n_grid,
                    seed=job.calib.seed, propagate="quantized")

    def step(calib: Any, targets: set[str]) -> dict[str, Any]:
        search_scales(calib, spec, targets, cfg, coverage, grams=False)
        return {}

    return step


class ScalesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n_grid: int = Field(20, ge=1, le=1000, description="AWQ alpha grid points in [0, 1): candidate scales per mapping")


SCALES = Step(name="awq-scales", Options=ScalesOptions, make=scales_step, memory=awq_block_memory, rounds=False)
