"""SmoothQuant's registered step (`quantkit.methods.steps`): the smoothing scales of a block, measured on the float
block and folded exactly into the previous op, so that the rounding step after it quantizes the smoothed weights
and the checkpoint needs no scales of its own."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from quantkit.methods.base import QuantJob
from quantkit.methods.blockwise import BlockStep
from quantkit.methods.smoothquant.smooth import SmoothConfig, alpha_grid, smooth_block
from quantkit.methods.steps import Step
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage
from quantkit.plan import F32, BlockWork, Geometry, Settings


class SmoothOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    smooth_alpha: float | None = Field(
        None, ge=0.0, le=1.0, description="fixed migration strength in [0, 1]; unset: measured per block")
    alpha_grid: int = Field(7, ge=1, le=41, description="candidate alphas in [0.3, 0.9] (and no smoothing) per block")
    score_batches: int = Field(1, ge=1, le=64, description="calibration batches the block's output error is scored on")


def smooth_step(job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
    o = job.options
    cfg = SmoothConfig(alpha=o.smooth_alpha, grid=alpha_grid(o.alpha_grid), score_batches=o.score_batches)

    def step(calib: Any, targets: set[str]) -> dict[str, Any]:
        smooth_block(calib, spec, targets, job.scheme, cfg)
        return {}

    return step


def smooth_memory(g: Geometry, s: Settings) -> BlockWork:
    """The float block's outputs on the scored batch (default 1), the saved float weights of the folded modules
    and the simulated (RTN) weights of the block's Linears, all alive while the block runs."""
    outputs = s.batch_size * s.seqlen * g.hidden * F32
    weights = 2 * sum(o * i for o, i in g.linears) * F32
    return BlockWork(work=outputs + weights, forward=outputs + weights, detail="smoothing: scored outputs + weights")


def _record(options: BaseModel) -> dict[str, Any]:
    return {"smoothing": "smoothquant"}


SMOOTH = Step(name="smooth", Options=SmoothOptions, make=smooth_step, memory=smooth_memory, rounds=False,
              record=_record)
