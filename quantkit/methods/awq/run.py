"""AWQ as a quantkit method: calibrate (or reload a dumped search), fold, clip, write the AWQ GEMM format.

`zero_point=False` selects a symmetric grid (the scheme's `sym`); the checkpoint's
quantization_config then says zero_point false and still stores the constant zeros.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from quantkit.errors import QuantkitError, SchemeError
from quantkit.formats.awq import AWQ_BITS
from quantkit.grid import QuantizedWeight, rtn_quantize
from quantkit.methods.awq.apply import apply_awq, load_search, save_search
from quantkit.methods.awq.block import _flat, awq_block, split_results
from quantkit.methods.awq.memory import awq_block_memory
from quantkit.methods.awq.search import AWQConfig
from quantkit.methods.base import Loaded, QuantJob, RunFacts, describe_moe
from quantkit.methods.blockwise import BlockStep, BlockwiseMethod
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage
from quantkit.plan import BlockWork, Geometry, Settings
from quantkit.scheme import QuantScheme

log = logging.getLogger(__name__)


class AWQOptions(BaseModel):
    """Method options (CLI flags --n-grid, --max-shrink, --zero-point/--no-zero-point, --dump-awq, --load-awq, --offload,
    --moe-calibration, --moe-min-tokens)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    n_grid: int = Field(20, ge=1, le=1000, description="alpha grid points in [0, 1), and clipping grid resolution")
    max_shrink: float = Field(0.5, ge=0.0, lt=1.0, description="largest fraction clipping may take off max |w|")
    zero_point: bool = Field(True, description="asymmetric grid with a zero point per group; false: symmetric")
    dump_awq: Path | None = Field(None, description="save the searched scales and clips to this safetensors file")
    load_awq: Path | None = Field(None, description="reapply scales and clips from this file, without calibration")
    offload: Literal["none", "disk"] = Field("none", description="disk: load decoder blocks one at a time from safetensors")
    moe_calibration: Literal["routed", "all"] = Field(
        "routed", description="MoE experts: routed = the router's tokens; all = every token (outputs stay routed)")
    moe_min_tokens: int = Field(16, ge=0, description="an expert that saw fewer calibration tokens gets no search (RTN)")


def awq_config(job: QuantJob) -> AWQConfig:
    s, o = job.scheme, job.options
    return AWQConfig(bits=s.bits, group_size=s.group_size, sym=s.sym, n_grid=o.n_grid,
                     max_shrink=o.max_shrink, seed=job.calib.seed)


class AWQ(BlockwiseMethod):
    name = "awq"
    description = "AWQ: activation-aware per-channel scaling and clipping (Lin et al. 2023), AutoAWQ GEMM format"
    formats = ("awq",)
    scheme_bits = (AWQ_BITS,)
    replaces_weights = True
    Options: ClassVar[type[BaseModel]] = AWQOptions
    tokenizer_hint = " or reapply a saved search with --load-awq"

    @classmethod
    def block_memory(cls, geometry: Geometry, settings: Settings) -> BlockWork:
        return awq_block_memory(geometry, settings)

    def check_scheme(self, scheme: QuantScheme) -> None:
        if scheme.bits != AWQ_BITS:
            raise SchemeError(f"the AWQ GEMM format stores 4-bit weights only, got --bits {scheme.bits}; use --bits 4 "
                              f"or --method gptq")
        if scheme.desc_act:
            raise SchemeError("AWQ has no act-order (the GEMM format has no g_idx); drop --desc-act")

    def prepare(self, job: QuantJob) -> QuantJob:
        self.check_scheme(job.scheme)
        s, o = job.scheme, job.options
        if not o.zero_point and not s.sym:
            job = dataclasses.replace(job, scheme=s.model_copy(update={"sym": True}))
        return job

    def block_step(self, job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
        cfg = awq_config(job)
        return lambda calib, targets: _flat(awq_block(calib, spec, targets, cfg, coverage))

    def quantize_loaded(self, loaded: Loaded, job: QuantJob, samples: Any, facts: RunFacts) -> dict[str, Any]:
        o = job.options
        if o.load_awq is None:
            return super().quantize_loaded(loaded, job, samples, facts)
        if loaded.blocks is not None:
            raise QuantkitError("--load-awq reapplies scales to a model in memory; drop --offload disk")
        apply_awq(loaded.model, load_search(o.load_awq), awq_config(job), set(loaded.layers))
        s = job.scheme
        return {n: rtn_quantize(lin.weight.data, s.bits, s.group_size, s.sym, lin.bias)
                for n, lin in loaded.layers.items()}

    def finish(self, results: dict[str, Any], job: QuantJob) -> dict[str, QuantizedWeight]:
        search, quantized = split_results(results, awq_config(job))
        if job.options.dump_awq is not None:
            save_search(search, job.options.dump_awq)
            log.info("saved the AWQ search (%d scales, %d clips) to %s", len(search.scales), len(search.clips),
                     job.options.dump_awq)
        return quantized

    def describe(self, job: QuantJob, facts: RunFacts | None = None) -> dict[str, Any]:
        o = job.options
        out: dict[str, Any] = {"options": o.model_dump(mode="json")}
        if o.load_awq is None:
            out["calibration"] = job.calib.model_dump()
            if facts is not None and facts.samples_sha256:
                out["calibration_sha256"] = facts.samples_sha256
        return describe_moe(out, facts)
