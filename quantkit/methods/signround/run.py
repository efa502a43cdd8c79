"""SignRound as a quantkit method: `tune_block` as the step of the block-wise pipeline, with the float
model's stream as the target (the pipeline carries it: `float_reference`), then an optional end-to-end
stage; written in the GPTQ format (plain codes, scales and zeros: transformers, vLLM and gptqmodel load it).

Each block is tuned on the quantized model's inputs to reproduce the float block's outputs on the float
model's inputs (AutoRound's default), so the error of the blocks before it is corrected for, not copied.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from quantkit.calib.fisher import block_output_fisher
from quantkit.calib.pipeline import BlockCalib
from quantkit.calib.prefix import batch_inputs, prefix_inputs
from quantkit.compute import can_compile
from quantkit.errors import SchemeError
from quantkit.grid import QuantizedWeight, rtn_quantize
from quantkit.methods.base import Loaded, QuantJob, RunFacts, describe_moe
from quantkit.methods.e2e.stage import E2EOptions, EndToEnd, calib_autocast, record_e2e_lr
from quantkit.methods.blockwise import BlockStep, BlockwiseMethod
from quantkit.methods.scaling import usable_mappings
from quantkit.methods.signround.block import GridOf, SignRoundParams, tune_block
from quantkit.methods.signround.memory import signround_block_memory
from quantkit.models.arch import ArchSpec, block_linears, get_blocks
from quantkit.models.moe import ExpertCoverage
from quantkit.plan import BlockWork, Geometry, Settings

log = logging.getLogger(__name__)


class SignRoundOptions(E2EOptions):
    """Method options (`--opt key=value`); the end-to-end stage's are `E2EOptions`'."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    iters: int = Field(50, ge=0, le=100_000, description="signed-gradient steps per block (0: RTN)")
    lr: float | None = Field(None, gt=0, description="step size of rounding and clipping; default 1 / iters")
    windows_per_step: int = Field(8, ge=1, description="calibration windows per tuning step")
    window_tokens: int = Field(0, ge=0, description="tune on the first N positions of each window (a causal block "
                                                    "gives them exactly; 0: whole windows)")
    clip_min: float = Field(0.5, gt=0, le=1, description="how far clipping may shrink a group's range")
    scale_lr: float = Field(0.0, ge=0, le=1, description="Adam step size of learned per-channel scales folded into "
                                                         "the norms and codes (OmniQuant's LET); 0: off")
    loss: Literal["mse", "token", "fisher"] = Field(
        "token", description="block loss: mse over every element (AutoRound's); token: each token's error relative "
                             "to its own mean square; fisher: token, its channels weighted by the float model's "
                             "Fisher of the block's outputs (a whole-model pass first)")
    fisher_windows: int = Field(32, ge=1, description="calibration windows of the fisher loss's whole-model pass")
    tune_norms: bool = Field(True, description="also tune the norm weights (float; the checkpoint stays standard)")
    norm_lr: float = Field(1e-3, gt=0, description="Adam step size of the norm weights")
    calib_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype the block computes in while tuning; auto: bfloat16 where the device is fast at it")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the tuning step; auto: on for 8+ steps a block where a compiler is found")
    offload: Literal["none", "disk"] = Field("none", description="disk: load decoder blocks one at a time")
    moe_calibration: Literal["routed", "all"] = Field("routed", description="MoE experts: the router's tokens")
    moe_min_tokens: int = Field(16, ge=0, description="kept for the pipeline's coverage report")


def use_compile(job: QuantJob, spec: ArchSpec | None = None) -> bool:
    """`compile` resolved: a compile costs tens of seconds once and serves every block of the same shape, and it
    saves 20-30% of each step, so auto turns it on from 8 steps a block (a 30-step run has 900 steps on a 30-block
    model), and off for MoE blocks, whose routed token counts change shape every step (a recompile each time), and
    for per-module grids (`--target-bpw`), where each block's mix of bits is a graph of its own."""
    o = job.options
    if o.compile != "auto":
        return o.compile == "on"
    return (o.iters >= 8 and can_compile(job.device) and (spec is None or spec.moe is None)
            and not job.scheme.overrides)


def signround_params(job: QuantJob, spec: ArchSpec | None = None) -> SignRoundParams:
    s, o = job.scheme, job.options
    return SignRoundParams(bits=s.bits, group_size=s.group_size, sym=s.sym, iters=o.iters, lr=o.lr,
                           batch_size=o.windows_per_step, clip_min=o.clip_min, tune_norms=o.tune_norms,
                           norm_lr=o.norm_lr, autocast=calib_autocast(job), compile=use_compile(job, spec), scale_lr=o.scale_lr,
                           loss=o.loss, seed=job.calib.seed)


def signround_block(calib: BlockCalib, spec: ArchSpec, targets: set[str], p: SignRoundParams,
                    window_tokens: int = 0, grid_of: GridOf | None = None,
                    channels: torch.Tensor | None = None) -> dict[str, QuantizedWeight]:
    """Tune one block's target Linears (relative names); returns their codes (the block keeps the dequantized weights).
    `window_tokens`: tune on that prefix of each window (`quantkit.calib.prefix`; 0: whole windows).
    `grid_of`: each Linear's own (bits, group_size) (per-module grids); None: the scheme's.
    `channels`: the block's output-channel weights of the "fisher" loss."""
    linears = {n: m for n, m in block_linears(calib.block, spec).items() if n in targets}
    if not linears:
        return {}
    masters = {n: calib.master(m).float() for n, m in linears.items()}
    if p.iters == 0 or calib.reference_outputs is None:
        out = {}
        for n, m in linears.items():
            out[n] = rtn_quantize(masters[n], *(grid_of or p.grid_of)(n), p.sym, m.bias)
            m.weight.data.copy_(out[n].dequantize(m.weight.dtype))
        return out
    dev = calib.device
    inputs = torch.cat(calib.inputs()).to(dev)
    target = torch.cat(calib.reference_outputs).to(dev)
    mappings = usable_mappings(calib.block, spec, set(linears)) if p.scale_lr > 0 else None
    args, kwargs = batch_inputs(calib.args, calib.block_kwargs, min(p.batch_size, inputs.shape[0]))
    cut = prefix_inputs(calib.block, inputs, args, kwargs, window_tokens) if window_tokens else None
    if cut is not None:
        args, kwargs = cut
        inputs, target = inputs[:, :window_tokens].contiguous(), target[:, :window_tokens].contiguous()
    res = tune_block(calib.block, linears, masters, inputs, target, args, kwargs,
                     SignRoundParams(**{**p.__dict__, "seed": p.seed + calib.index}), mappings, grid_of=grid_of,
                     channels=channels)
    return {n: q.to("cpu") for n, q in res.items()}


def model_channel_fisher(loaded: Loaded, job: QuantJob, samples: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output-channel Fisher profile (`block_output_fisher`) on the first `fisher_windows`
    calibration windows, the model on the job's device for the pass and back on the CPU after it."""
    t0 = time.perf_counter()
    model, n = loaded.model, job.options.fisher_windows
    model.to(job.device)
    try:
        out = block_output_fisher(model, get_blocks(model, loaded.spec), samples[:n], job.device, job.calib.seed)
    finally:
        model.to("cpu")
    spread = max(float(u.max()) for u in out)
    log.info("signround: fisher of %d blocks' outputs on %d windows (largest channel weight %.3g), %.1fs",
             len(out), min(n, len(samples)), spread, time.perf_counter() - t0)
    return out


class SignRound(EndToEnd, BlockwiseMethod):
    name = "signround"
    description = "SignRound: rounding, clipping and norms tuned per block against the float model (AutoRound's algorithm)"
    formats = ("gptq", "compressed-tensors")
    Options: ClassVar[type[BaseModel]] = SignRoundOptions
    tokenizes_first = True
    float_reference = True
    module_grids = True
    _channels: list[torch.Tensor] | None = None  # this run's fisher channel weights per block (quantize_loaded)

    def prepare(self, job: QuantJob) -> QuantJob:
        if job.scheme.desc_act:
            raise SchemeError("signround tunes every group's own grid; drop --desc-act")
        if job.options.loss == "fisher" and job.options.offload == "disk":
            raise SchemeError("signround's fisher loss needs the whole model in memory for its gradient pass; drop "
                              "--offload disk or use --opt loss=token")
        return super().prepare(job)

    def quantize_loaded(self, loaded: Loaded, job: QuantJob, samples: torch.Tensor | None,
                        facts: RunFacts) -> dict[str, Any]:
        """With the fisher loss, a whole-model gradient pass on the float model first (its blocks' output-channel
        weights, read by `block_step`), then the block stage (and the end-to-end stage, `EndToEnd`)."""
        self._channels = None
        if job.options.loss == "fisher" and loaded.tokenizer is not None:
            if samples is None:
                samples = self.calibration(loaded.tokenizer, job)
            self._channels = model_channel_fisher(loaded, job, samples)
        return super().quantize_loaded(loaded, job, samples, facts)

    def plan_settings(self, job: QuantJob) -> dict[str, Any]:
        return {**super().plan_settings(job), "gradient_pass": job.options.loss == "fisher"}

    @classmethod
    def block_memory(cls, geometry: Geometry, settings: Settings) -> BlockWork:
        return signround_block_memory(geometry, settings)

    def stream_autocast(self, job: QuantJob) -> torch.dtype | None:
        # the float reference and the quantized stream in the dtype the tuning computes in (as AutoRound's amp):
        # 3x faster passes (fp32 0.57 vs bf16 0.19 CPU s for 16 windows through a SmolLM2 block)
        return calib_autocast(job)

    def block_step(self, job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
        p, scheme = signround_params(job, spec), job.scheme

        def step(calib: BlockCalib, targets: set[str]) -> dict[str, QuantizedWeight]:
            prefix = f"{spec.blocks}.{calib.index}."

            def grid_of(name: str) -> tuple[int, int]:  # the scheme's grid, or the Linear's own (--target-bpw)
                g = scheme.grid_of(prefix + name)
                return g.bits, g.group_size
            channels = self._channels
            return signround_block(calib, spec, targets, p, job.options.window_tokens, grid_of,
                                   None if channels is None else channels[calib.index])
        return step

    def e2e_compile(self, job: QuantJob, spec: ArchSpec) -> bool:
        return use_compile(job, spec)

    def describe(self, job: QuantJob, facts: RunFacts | None = None) -> dict[str, Any]:
        opts = record_e2e_lr(job.options.model_dump(mode="json"), job)
        dt = calib_autocast(job)
        opts["calib_dtype_used"] = "float32" if dt is None else str(dt).removeprefix("torch.")
        opts["compile_used"] = use_compile(job)
        if opts.get("loss") != "fisher":
            opts.pop("fisher_windows", None)  # read only by the fisher loss: records as before it existed
        out: dict[str, Any] = {"options": opts, "calibration": job.calib.model_dump(mode="json")}
        if facts is not None and facts.samples_sha256:
            out["calibration"]["sha256"] = facts.samples_sha256
        out = describe_moe(out, facts)
        if "moe" in out and job.options.compile == "auto":
            opts["compile_used"] = False  # auto is off for MoE blocks (use_compile)
        return out
