"""GPTQ as a quantkit method: `gptq_block` (quantkit.methods.gptq.block) as the step of the block-wise
pipeline (quantkit.methods.blockwise), with its options, calibration dtype policy and record."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field
from torch import Tensor

from quantkit.errors import SchemeError
from quantkit.methods.base import EncodedArtifact, GridTarget, Loaded, QuantJob, RunFacts, describe_moe
from quantkit.methods.blockwise import BlockStep, BlockwiseMethod
from quantkit.methods.e2e.stage import E2EOptions, EndToEnd, record_e2e_lr, without_unused_e2e
from quantkit.methods.gptq.algorithm import GPTQParams
from quantkit.methods.gptq.block import gptq_block
from quantkit.methods.gptq.grid import grid_group, input_stats
from quantkit.methods.gptq.memory import gptq_block_memory
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage
from quantkit.plan import BlockWork, Geometry, Settings

log = logging.getLogger(__name__)

# GGUF mixes where rounding for llama.cpp's 8-bit activations (q8_target, alpha 0.5) was measured to pay, so
# activations="auto" picks it there. llama-perplexity --kl-divergence, SmolLM2-135M, 40 chunks of 512, mean KLD /
# llama.cpp's imatrix file of the same type, GPTQ with float activations -> q8_target (benchmarks/results/gguf.md,
# sessions 15-16): q5_k_m 0.830 -> 0.804 (a second calibration draw: 0.810 -> 0.802), q6_k 0.809 -> 0.778,
# q8_0 0.838 -> 0.795. Not in it: q5_k_s (0.927 -> 0.931, alpha 0.25 0.941: no gain) and every mix below
# 5 bits (not measured): "auto" is float there.
Q8_TARGET_MIXES = frozenset({"q5_k_m", "q6_k", "q8_0"})


class GPTQOptions(E2EOptions):
    """Method options (CLI flags --damp, --block-size, --true-sequential/--no-true-sequential, --offload,
    --act-group-aware/--no-act-group-aware, --moe-calibration, --moe-min-tokens); the end-to-end stage's
    (`--opt e2e_steps=32`: scales and norms tuned against the float model after the blocks) are `E2EOptions`'."""

    damp: float = Field(0.01, ge=0.0, le=1.0, description="dampening: fraction of the mean Hessian diagonal")
    float_target: bool = Field(False, description="round each Linear towards the float model's outputs on its own "
                                                  "inputs (GPTAQ), not towards W on the quantized model's inputs")
    block_size: int = Field(128, ge=1, le=4096, description="columns per lazy-update block")
    true_sequential: bool = Field(True, description="calibrate each Linear group on the already-quantized earlier groups")
    offload: Literal["none", "disk"] = Field("none", description="disk: load decoder blocks one at a time from safetensors")
    damp_retries: int = Field(3, ge=0, le=10, description="Cholesky retries, each with 10x the dampening, before RTN")
    act_group_aware: bool = Field(
        True, description="group-aware reordering (GAR) when desc_act is off: same format, g_idx trivial")
    moe_calibration: Literal["routed", "all"] = Field(
        "routed", description="MoE experts: routed = the router's tokens; all = every token (outputs stay routed)")
    moe_min_tokens: int = Field(16, ge=0, description="an expert that saw fewer calibration tokens gets RTN")
    shortcuts: bool = Field(
        True, description="later passes replace attention by its last (quantized) Linear on its recorded inputs "
                          "once checked exact (same codes, attention run once per block, + tokens x hidden memory)")
    calib_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the blocks compute in during calibration (Hessians and GPTQ stay float32); "
                               "auto: bfloat16 where the device computes it fast (CUDA, AMX CPUs)")
    hessian_products: Literal["compute", "float32"] = Field(
        "compute", description="dtype of the Hessian's XᵀX products (always summed in float32): compute = the "
                               "calibration dtype (16-bit products are 3-4x faster), float32 = always float32")
    head: Literal["plain", "gptq"] = Field(
        "gptq", description="onto a format with a grid for the output head (--format gguf): gptq = round the head "
                            "(a tied embedding's one tensor) with error feedback through the Hessian of the final "
                            "norm's outputs; plain = the format's own rounding")
    head_embed_weight: float = Field(
        0.1, ge=0.0, description="head=gptq with a tied embedding: the Hessian plus this x its mean diagonal x I "
                                 "(the lookup's own, unweighted error); 0 = the head alone, large = plain rounding")
    activations: Literal["float", "auto", "q8", "q8_hessian", "q8_target"] = Field(
        "float", description="onto GGUF (--format gguf): the decoder Linears' activations GPTQ rounds for: float, or "
                             "q8 = as llama.cpp's CPU matmul quantizes them for each weight type (Q8_0 / Q8_1 / Q8_K): "
                             "the least-squares target for them, rounded with their Hessian; q8_hessian = their "
                             "Hessian only (the weight itself as the target); q8_target = the least-squares target "
                             "rounded with the float Hessian; auto = q8_target at the mixes where it was measured to "
                             "pay (q5_k_m, q6_k, q8_0), float elsewhere (the record shows the choice)")
    activations_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="activations=q8 or q8_target: how far the target moves from the weight W "
                                         "towards the least-squares W*: W + alpha (W* - W) (0.5 measured better than 1 "
                                         "at q6_k and q8_0 by llama-perplexity)")
    head_activations: Literal["float", "q8_0"] = Field(
        "float", description="head=gptq: the activations the head is rounded for: float, or q8_0 = as llama.cpp's "
                             "CPU matmul quantizes them for a Q8_0/Q4_0/Q5_0/IQ4_NL head (least-squares target)")


def calib_dtype(job: QuantJob) -> str:
    """The dtype blocks compute in while calibrating: the option, with auto resolved for the job's device."""
    from quantkit.compute import resolve_calib_dtype

    return resolve_calib_dtype(job.options.calib_dtype, job.device)


def gptq_params(job: QuantJob) -> GPTQParams:
    s, o = job.scheme, job.options
    return GPTQParams(bits=s.bits, group_size=s.group_size, sym=s.sym, desc_act=s.desc_act,
                      static_groups=s.static_groups, damp=o.damp, block_size=o.block_size,
                      damp_retries=o.damp_retries, group_aware=o.act_group_aware, number=s.type,
                      per_tensor=s.weight_strategy == "tensor", observer=s.observer)


def resolved_activations(options: BaseModel, target: GridTarget | None) -> str:
    """The activations option with "auto" resolved: q8_target onto a GGUF mix in Q8_TARGET_MIXES, else float
    (off GGUF, and for a composed method's rounding step, which has no such option)."""
    chosen = getattr(options, "activations", "float")
    if chosen != "auto":
        return chosen
    return "q8_target" if target is not None and target.mix in Q8_TARGET_MIXES else "float"


def input_qmax(job: QuantJob) -> float | None:
    """The activation grid's half range when the scheme calibrates static input scales, else None."""
    return job.scheme.input_activations.qmax if job.scheme.activation_static else None


def gptq_step(job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
    """GPTQ rounding of a block's targets (in true-sequential order unless the option says otherwise)."""
    params, o, qmax = gptq_params(job), job.options, input_qmax(job)
    to_float = getattr(o, "float_target", False)  # a composed method's rounding step takes GPTQ's core options only
    if to_float and spec.moe is not None:
        raise SchemeError("--opt float_target pairs each token's float and quantized inputs; an MoE model's experts "
                          "see different tokens in the two streams: drop it")

    codecs = job.target.codecs if job.target is not None else None
    activations = resolved_activations(o, job.target)

    def step(calib: Any, targets: set[str]) -> dict[str, Any]:
        prefix = f"{spec.blocks}.{calib.index}."
        alpha = getattr(o, "activations_alpha", 0.5)
        onto = grid_group(codecs, prefix, params, alpha) if codecs is not None else None
        stats = (input_stats(codecs, prefix, cross=activations in ("q8", "q8_target"),
                             float_hessian=activations == "q8_target")
                 if codecs is not None and activations != "float" else None)
        params_of = None
        if job.scheme.overrides:
            def params_of(name: str) -> GPTQParams:
                g = job.scheme.grid_of(prefix + name)
                return replace(params, bits=g.bits, group_size=g.group_size)
        return gptq_block(calib, spec, {prefix + n for n in targets}, params, o.true_sequential,
                          coverage=coverage, shortcuts=o.shortcuts, input_qmax=qmax, quantize=onto,
                          low_precision_products=o.hessian_products == "compute",
                          params_of=params_of, to_float=to_float, accumulator=stats)

    return step


class GPTQ(EndToEnd, BlockwiseMethod):
    name = "gptq"
    description = "GPTQ: second-order error compensation with calibration data (Frantar et al. 2022)"
    formats = ("gptq", "compressed-tensors")
    activation_schemes = True
    static_activations = True
    Options: ClassVar[type[BaseModel]] = GPTQOptions
    tokenizes_first = True
    grid_rounding = True
    module_grids = True

    def prepare(self, job: QuantJob) -> QuantJob:
        self.check_end_to_end(job)
        if job.options.float_target and job.target is not None:
            raise SchemeError(f"--opt float_target rounds onto the scheme's own grid; it does not apply to "
                              f"{job.target.label}")
        if job.target is None:
            o, defaults = job.options, GPTQOptions.model_fields
            moved = [k for k in ("activations", "activations_alpha", "head_activations", "head_embed_weight")
                     if getattr(o, k) != defaults[k].default]
            if resolved_activations(o, None) == "float" and "activations" in moved:
                moved.remove("activations")  # float (or auto, which is float here) is what runs off GGUF
            if moved:  # head=gptq itself is the default, and a recorded recipe repeats it: a no-op off GGUF
                why = ("it rounds for llama.cpp's 8-bit activations" if moved[0].startswith("activations")
                       else "a format with a grid for the output head")
                raise SchemeError(f"--opt {moved[0]} goes with --format gguf ({why})")
            return super().prepare(job)
        s = job.scheme
        if s.input_activations is not None or s.type != "int" or s.strategy is not None:
            raise SchemeError(f"{job.target.label} stores weights only; 8-bit activation and FP8 schemes do not apply")
        if s.desc_act:
            raise SchemeError(f"--desc-act does not apply to {job.target.label}: its blocks hold consecutive inputs")
        if s.overrides:
            raise SchemeError(f"{job.target.label} gives each tensor its type; per-module grids do not apply")
        return job

    def plan_settings(self, job: QuantJob) -> dict[str, Any]:
        """The products fed per Linear group: H; a cross product and a second Hessian beside it with the float
        targets or llama.cpp's 8-bit activations (one activation type a group), and the float stream."""
        out = super().plan_settings(job)
        o = job.options
        products = {"q8": 2, "q8_target": 3}.get(resolved_activations(o, job.target), 1)
        out.update(hessians=max(products, 2 if o.float_target else 1), float_stream=bool(o.float_target))
        return out

    def uses_reference(self, job: QuantJob) -> bool:
        return job.options.float_target  # the float model's stream, for the float targets

    def block_store(self, job: QuantJob, spec: ArchSpec) -> Any:
        return None if job.target is not None else super().block_store(job, spec)

    def artifact(self, job: QuantJob, loaded: Loaded, results: dict[str, Any], extra: dict[str, Any]) -> Any:
        if job.target is None:
            return super().artifact(job, loaded, results, extra)
        return self.encoded_artifact(job, loaded, results, extra)

    def calib_dtype(self, job: QuantJob) -> str:
        return calib_dtype(job)

    def final_step(self, job: QuantJob, loaded: Loaded) -> Callable[[list[Tensor]], dict[str, Any]] | None:
        if job.target is None or job.options.head != "gptq":
            return None
        from quantkit.methods.gptq.activations import Q8_0_WEIGHTS
        from quantkit.methods.gptq.head import head_hessian, head_target, round_head

        target = head_target(loaded.model, loaded.spec, job.target.codecs)
        if target is None:
            return None
        params, weight, act_q8 = gptq_params(job), job.options.head_embed_weight, job.options.head_activations == "q8_0"
        if act_q8 and target.codec.name not in Q8_0_WEIGHTS:
            raise SchemeError(f"--opt head_activations=q8_0: the head's type {target.codec.name} takes Q8_K/Q8_1 "
                              f"activations in llama.cpp, not Q8_0")

        def final(hidden: list[Tensor]) -> dict[str, Any]:
            return round_head(target, head_hessian(target, hidden, job.device, act_q8), params, weight)

        return final

    def params(self, job: QuantJob) -> GPTQParams:
        return gptq_params(job)

    @classmethod
    def block_memory(cls, geometry: Geometry, settings: Settings) -> BlockWork:
        return gptq_block_memory(geometry, settings)

    def block_step(self, job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
        return gptq_step(job, spec, coverage)

    def describe(self, job: QuantJob, facts: RunFacts | None = None) -> dict[str, Any]:
        opts = record_e2e_lr(without_unused_e2e(job.options.model_dump(mode="json")), job)
        if job.target is None:  # the head options act only on a format with a grid for the head (GGUF)
            for k in ("head", "head_embed_weight", "head_activations", "activations", "activations_alpha"):
                opts.pop(k, None)
        opts["damp_percent"] = job.options.damp
        opts["calib_dtype_used"] = calib_dtype(job)
        out: dict[str, Any] = {"options": opts, "calibration": job.calib.model_dump(mode="json")}
        if facts is not None and facts.samples_sha256:
            out["calibration"]["sha256"] = facts.samples_sha256
        if job.target is not None:  # each grid searched per block on the error-updated weights
            out["target"] = job.target.label
            opts["activations"] = resolved_activations(job.options, job.target)  # "auto" as it resolved
        return describe_moe(out, facts)
