"""SignRound as a quantkit method: `tune_block` over the block pipeline, with the float model's stream as the
target, written in the GPTQ format (or AWQ GEMM, same codes).

Each block is tuned on the quantized model's inputs to reproduce the float block's outputs on the float
model's inputs (AutoRound's default), so the error of the blocks before it is corrected for, not copied.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantkit.calib.data import calibration_samples, fingerprint
from quantkit.calib.pipeline import BlockCalib, BlockSource, run_sequential
from quantkit.compute import fast_bfloat16
from quantkit.errors import QuantkitError
from quantkit.grid import QuantizedWeight, rtn_quantize
from quantkit.methods.base import QuantJob, WeightOnlyMethod
from quantkit.methods.signround.block import SignRoundParams, tune_block
from quantkit.models.arch import ArchSpec, block_linears

log = logging.getLogger(__name__)


class SignRoundOptions(BaseModel):
    """Method options (`--opt key=value`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    iters: int = Field(100, ge=0, le=100_000, description="signed-gradient steps per block (0: RTN)")
    lr: float | None = Field(None, gt=0, description="step size of rounding and clipping; default 1 / iters")
    batch_size: int = Field(8, ge=1, description="calibration windows per step")
    clip_min: float = Field(0.5, gt=0, le=1, description="how far clipping may shrink a group's range")
    tune_norms: bool = Field(True, description="also tune the norm weights (float; the checkpoint stays standard)")
    norm_lr: float = Field(1e-3, gt=0, description="Adam step size of the norm weights")
    calib_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype the block computes in while tuning; auto: bfloat16 where the device is fast at it")
    offload: Literal["none", "disk"] = Field("none", description="disk: load decoder blocks one at a time")


def autocast_dtype(job: QuantJob) -> torch.dtype | None:
    dt = job.options.calib_dtype
    if dt == "auto":
        dt = "bfloat16" if fast_bfloat16(job.device) else "float32"
    return None if dt == "float32" else getattr(torch, dt)


def signround_block(calib: BlockCalib, spec: ArchSpec, targets: set[str], p: SignRoundParams) -> dict[str, QuantizedWeight]:
    """Tune one block's target Linears; returns relative name -> codes (the block keeps the dequantized weights)."""
    prefix = f"{spec.blocks}.{calib.index}."
    linears = {n: m for n, m in block_linears(calib.block, spec).items() if prefix + n in targets}
    if not linears:
        return {}
    masters = {n: calib.master(m).float() for n, m in linears.items()}
    if p.iters == 0 or calib.reference_outputs is None:
        out = {}
        for n, m in linears.items():
            out[n] = rtn_quantize(masters[n], p.bits, p.group_size, p.sym, m.bias)
            m.weight.data.copy_(out[n].dequantize(m.weight.dtype))
        return out
    dev = calib.device
    inputs = torch.cat(calib.inputs()).to(dev)
    target = torch.cat(calib.reference_outputs).to(dev)
    res = tune_block(calib.block, linears, masters, inputs, target, calib.args, calib.block_kwargs,
                     SignRoundParams(**{**p.__dict__, "seed": p.seed + calib.index}))
    return {n: _cpu(q) for n, q in res.items()}


def _cpu(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(codes=qw.codes.cpu(), scales=qw.scales.cpu(), zeros=qw.zeros.cpu(), g_idx=qw.g_idx.cpu(),
                           bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
                           bias=None if qw.bias is None else qw.bias.cpu())


class SignRound(WeightOnlyMethod):
    name = "signround"
    description = "SignRound: rounding and clipping tuned per block by signed gradients (AutoRound's algorithm)"
    needs_calibration = True
    formats = ("gptq",)
    Options = SignRoundOptions
    resumable = True

    def quantize(self, job: QuantJob):
        if job.scheme.desc_act:
            from quantkit.errors import SchemeError

            raise SchemeError("signround tunes every group's own grid; drop --desc-act")
        if job.options.offload == "disk":
            from quantkit.calib.offload import quantize_offloaded

            return quantize_offloaded(self, job)
        return super().quantize(job)

    def params(self, job: QuantJob) -> SignRoundParams:
        s, o = job.scheme, job.options
        return SignRoundParams(bits=s.bits, group_size=s.group_size, sym=s.sym, iters=o.iters, lr=o.lr,
                               batch_size=o.batch_size, clip_min=o.clip_min, tune_norms=o.tune_norms,
                               norm_lr=o.norm_lr, autocast=autocast_dtype(job), seed=job.calib.seed)

    def quantize_model(self, model: nn.Module, tokenizer: Any, spec: ArchSpec, layers: dict[str, nn.Linear],
                       job: QuantJob, blocks: BlockSource | None = None) -> dict[str, QuantizedWeight]:
        if tokenizer is None:
            raise QuantkitError("signround needs a tokenizer for calibration; add tokenizer files to the model folder")
        c, p, targets = job.calib, self.params(job), set(layers)
        samples = calibration_samples(tokenizer, c.dataset, c.nsamples, c.seqlen, c.seed, c.text_field)
        self._fingerprint = fingerprint(samples)
        log.info("signround: %d Linears, %d samples x %d tokens, %d steps per block", len(layers), len(samples),
                 samples.shape[1], p.iters)
        return run_sequential(model, spec, samples, lambda calib: signround_block(calib, spec, targets, p),
                              device=job.device, batch_size=c.batch_size, blocks=blocks, progress=job.progress,
                              store=self.block_store(job, spec), reference=True)

    def describe(self, job: QuantJob) -> dict[str, Any]:
        opts = job.options.model_dump(mode="json")
        dt = autocast_dtype(job)
        opts["calib_dtype_used"] = "float32" if dt is None else str(dt).removeprefix("torch.")
        out: dict[str, Any] = {"options": opts, "calibration": job.calib.model_dump(mode="json")}
        if fp := getattr(self, "_fingerprint", None):
            out["calibration"]["sha256"] = fp
        return out
