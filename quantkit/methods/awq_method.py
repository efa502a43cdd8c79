"""AWQ as a quantkit method: calibrate (or reload a dumped search), fold, clip, write the AWQ GEMM format.

`zero_point=False` selects a symmetric grid (the scheme's `sym`); the checkpoint's
quantization_config then says zero_point false and still stores the constant zeros.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from quantkit.calib.data import calibration_samples, fingerprint
from quantkit.calib.pipeline import BlockSource
from quantkit.errors import QuantkitError, SchemeError
from quantkit.formats.awq import AWQ_BITS
from quantkit.formats.checkpoint import PackedArtifact
from quantkit.grid import QuantizedWeight, rtn_quantize
from quantkit.methods.awq import AWQConfig, AWQDataError, AWQSearch, apply_awq
from quantkit.methods.awq_calib import run_awq
from quantkit.methods.base import QuantJob, WeightOnlyMethod
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage

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


def save_search(search: AWQSearch, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(search.tensors(), str(path), metadata={"format": "quantkit-awq", **search.meta})


def load_search(path: Path) -> AWQSearch:
    path = Path(path)
    if not path.is_file():
        raise AWQDataError(f"AWQ search file {path} does not exist; create it with --dump-awq")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise AWQDataError(f"cannot read AWQ search file {path}: {str(e).splitlines()[0]}") from None
    if meta.get("format") != "quantkit-awq":
        raise AWQDataError(f"{path} is not an AWQ search file written by --dump-awq")
    return AWQSearch.from_tensors(tensors, {k: v for k, v in meta.items() if k != "format"})


class AWQ(WeightOnlyMethod):
    name = "awq"
    description = "AWQ: activation-aware per-channel scaling and clipping (Lin et al. 2023), AutoAWQ GEMM format"
    needs_calibration = True
    formats = ("awq",)
    Options = AWQOptions
    resumable = True

    def quantize(self, job: QuantJob) -> PackedArtifact:
        s, o = job.scheme, job.options
        if s.bits != AWQ_BITS:
            raise SchemeError(f"the AWQ GEMM format stores 4-bit weights only, got --bits {s.bits}; use --bits 4 "
                              f"or --method gptq")
        if s.desc_act:
            raise SchemeError("AWQ has no act-order (the GEMM format has no g_idx); drop --desc-act")
        if not o.zero_point and not s.sym:
            job = dataclasses.replace(job, scheme=s.model_copy(update={"sym": True}))
        if o.offload == "disk":
            from quantkit.calib.offload import quantize_offloaded

            return quantize_offloaded(self, job)
        return super().quantize(job)

    def config(self, job: QuantJob) -> AWQConfig:
        s, o = job.scheme, job.options
        return AWQConfig(bits=s.bits, group_size=s.group_size, sym=s.sym, n_grid=o.n_grid,
                         max_shrink=o.max_shrink, seed=job.calib.seed)

    def quantize_model(self, model: nn.Module, tokenizer: Any, spec: ArchSpec, layers: dict[str, nn.Linear],
                       job: QuantJob, blocks: BlockSource | None = None) -> dict[str, QuantizedWeight]:
        """`blocks`: the disk-offload block source (then `model` holds no block weights)."""
        cfg, o = self.config(job), job.options
        self.coverage = None
        if o.load_awq is not None:
            if blocks is not None:
                raise QuantkitError("--load-awq reapplies scales to a model in memory; drop --offload disk")
            search = load_search(o.load_awq)
            apply_awq(model, search, cfg, set(layers))
            s = job.scheme
            return {n: rtn_quantize(lin.weight.data, s.bits, s.group_size, s.sym, lin.bias) for n, lin in layers.items()}
        if tokenizer is None:
            raise QuantkitError("AWQ needs a tokenizer for calibration; add tokenizer files to the model folder "
                                "or reapply a saved search with --load-awq")
        c = job.calib
        samples = calibration_samples(tokenizer, c.dataset, c.nsamples, c.seqlen, c.seed, c.text_field)
        self._fingerprint = fingerprint(samples)
        self.coverage = ExpertCoverage(o.moe_calibration, o.moe_min_tokens)
        search, quantized = run_awq(model, samples, cfg, set(layers), device=job.device, batch_size=c.batch_size,
                                    store=self.block_store(job, spec),
                                    blocks=blocks, progress=job.progress, coverage=self.coverage)
        if o.dump_awq is not None:
            save_search(search, o.dump_awq)
            log.info("saved the AWQ search (%d scales, %d clips) to %s", len(search.scales), len(search.clips), o.dump_awq)
        return quantized

    def describe(self, job: QuantJob) -> dict[str, Any]:
        o = job.options
        out: dict[str, Any] = {"options": o.model_dump(mode="json")}
        if o.load_awq is None:
            out["calibration"] = job.calib.model_dump()
            if fp := getattr(self, "_fingerprint", None):
                out["calibration_sha256"] = fp
        return self.describe_moe(out)
