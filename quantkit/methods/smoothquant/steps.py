"""SmoothQuant's registered step (`quantkit.methods.steps`): the smoothing scales of a block, measured on the float
block and folded exactly into the previous op, so that the rounding step after it quantizes the smoothed weights
and the checkpoint needs no scales of its own."""

from __future__ import annotations

from typing import Any, Literal

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
        None, ge=0.0, le=1.0, description="fixed migration strength in [0, 1]; unset: measured per layer")
    alpha_grid: int = Field(7, ge=1, le=41, description="candidate alphas in [0.3, 0.9] (and no smoothing) per layer")
    score_tokens: int = Field(512, ge=16, le=1 << 20,
                              description="calibration tokens (seeded subsample) each mapping's alpha is scored on")
    calib_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype the blocks compute in while calibrated (statistics, Hessians, the stream to the "
                            "next block; scales folded and weights rounded in float32); auto: bfloat16 where the "
                            "device computes it fast (CUDA, AMX CPUs; SmolLM2 W8A8, 64 x 512 "
                            "tokens, 1 AMX thread: 148 CPU s against 320 in float32 at 0.97x the KL; Gemma 3 270M: 102 "
                            "against 139 CPU s, but 1.39x the KL: float32 for the last bit of quality)")


def smooth_step(job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
    o = job.options
    cfg = SmoothConfig(alpha=o.smooth_alpha, grid=alpha_grid(o.alpha_grid), score_tokens=o.score_tokens,
                       seed=job.calib.seed)

    def step(calib: Any, targets: set[str]) -> dict[str, Any]:
        smooth_block(calib, spec, targets, job.scheme, cfg)
        return {}

    return step


def smooth_memory(g: Geometry, s: Settings) -> BlockWork:
    """The token subsample per input site (kept over the pass) and, while a mapping is scored, its stacked weight,
    its smoothed and simulated copies and the outputs on the subsample."""
    tokens = 512
    sample = sum(i for _, i in g.groups) * tokens * F32
    rows, in_f = max(g.groups, key=lambda ri: ri[0] * ri[1])
    score = (4 * rows * in_f + 3 * tokens * max(rows, in_f)) * F32
    return BlockWork(work=sample + score, forward=sample, detail="smoothing: token sample + scored weights")


def _record(options: BaseModel) -> dict[str, Any]:
    return {"smoothing": "smoothquant"}


SMOOTH = Step(name="smooth", Options=SmoothOptions, make=smooth_step, memory=smooth_memory, rounds=False,
              record=_record)
