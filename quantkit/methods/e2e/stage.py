"""The end-to-end stage as a part any block-wise method can take: its options, and a mixin that runs it after the
blocks (`EndToEnd`). The maths is `quantkit.methods.e2e.tune`.

After a method has rounded every block, the integer codes stay as they are and what a standard checkpoint keeps in
float (the group scales, the norms) is tuned on the whole model against the float model's logits. SignRound
(AutoRound's block stage) and GPTQ (second-order rounding) both take it: `--opt e2e_steps=32`. Onto a caller's
block format (GGUF, `QuantJob.target`) the stage tunes each block's float16 scale and min instead
(`quantkit.methods.e2e.headers`), the codes and integer sub-scales fixed.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from quantkit.calib.pipeline import place_outside_blocks
from quantkit.compute import can_compile, resolve_calib_dtype
from quantkit.errors import SchemeError
from quantkit.grid import QuantizedWeight
from quantkit.methods.base import EncodedArtifact, GridTarget, Loaded, QuantJob, RunFacts
from quantkit.methods.e2e.headers import HeaderParts, tune_headers
from quantkit.methods.e2e.stored import stored_results
from quantkit.methods.e2e.norms import norm_params
from quantkit.methods.e2e.tune import E2EParams, teacher_of, tune_end_to_end
from quantkit.models.arch import ArchSpec
from quantkit.models.sources import load_model

log = logging.getLogger(__name__)
# The stage's default Adam step: on integer grids the group log-scales take 1e-3. A GGUF type's float16 block
# headers sit in a nearly lossless model (SmolLM2 q5_k_m: calibration KL 0.001 before the stage): there 1e-3 to
# 1e-4 raised the KL from the first step, and 3e-5 lowered llama.cpp's KLD by 1.4% (q5_k_m) and 9.3% (q4_k_m)
# (benchmarks/results/gguf.md, sessions 21-22).
GRID_LR = 1e-3
HEADER_LR = 3e-5
E2E_FIELDS = ("e2e_steps", "e2e_batch_size", "e2e_lr", "e2e_rounding_lr", "e2e_embedding_lr", "e2e_norms",
              "e2e_token_fraction")


class E2EOptions(BaseModel):
    """The end-to-end stage's options, inherited by the options of every method that takes the stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    e2e_steps: int = Field(0, ge=0, le=100_000, description="end-to-end steps after the blocks: scales and norms "
                                                            "against the float model's logits (needs it in memory)")
    e2e_batch_size: int = Field(2, ge=1, description="calibration windows per end-to-end step")
    e2e_lr: float | None = Field(None, gt=0, description="Adam step size of the log-scales and norms end to end "
                                                         f"(default: {GRID_LR:g} on integer grids, {HEADER_LR:g} on "
                                                         "a GGUF type's block headers)")
    e2e_rounding_lr: float = Field(0.0, ge=0, le=1, description="signed step of the rounding offsets end to end "
                                                                "(0: the codes stay as the blocks left them)")
    e2e_embedding_lr: float = Field(0.0, ge=0, le=1, description="Adam step size of the token embedding and output "
                                                                 "layer end to end, which the checkpoint keeps in "
                                                                 "float (0: they stay the float model's)")
    e2e_token_fraction: float = Field(1.0, gt=0, le=1, description="share of each end-to-end step's token "
                                                                   "positions whose logits enter the KL, drawn "
                                                                   "at random (seeded): the vocabulary-sized "
                                                                   "products shrink with it")
    e2e_norms: Literal["additive", "relative", "off"] = Field(
        "additive", description="how the stage steps the norms: additive (Adam on the weights), relative (on "
                                "log-gains: tiny weights move by their own size), or off")


def calib_autocast(job: QuantJob) -> torch.dtype | None:
    """The autocast dtype of a job's `calib_dtype` option, resolved for its device (None: float32); the stage
    computes in it."""
    dt = resolve_calib_dtype(getattr(job.options, "calib_dtype", "float32"), job.device)
    return None if dt == "float32" else getattr(torch, dt)


def e2e_lr(job: QuantJob) -> float:
    """The stage's Adam step: `e2e_lr` as given, else the default for what it tunes (GRID_LR, HEADER_LR)."""
    given = job.options.e2e_lr
    return given if given is not None else (HEADER_LR if job.target is not None else GRID_LR)


def e2e_params(job: QuantJob, compile_step: bool) -> E2EParams:
    o = job.options
    lr = e2e_lr(job)
    return E2EParams(steps=o.e2e_steps, batch_size=o.e2e_batch_size, lr=lr, norm_lr=lr,
                     rounding_lr=o.e2e_rounding_lr, embedding_lr=o.e2e_embedding_lr, norms=o.e2e_norms,
                     token_fraction=o.e2e_token_fraction, autocast=calib_autocast(job),
                     compile=compile_step, seed=job.calib.seed)


class EndToEnd:
    """Mixin for a `BlockwiseMethod` whose options derive from `E2EOptions`: with `e2e_steps` > 0, the block
    stage's results are tuned end to end before they are written. Put it first among the bases."""

    def check_end_to_end(self, job: QuantJob) -> None:
        o = job.options
        if not o.e2e_steps:
            return
        name = getattr(self, "name", "this method")
        if job.target is not None:
            moved = [k for k in ("e2e_rounding_lr", "e2e_embedding_lr") if getattr(o, k)]
            if moved:
                raise SchemeError(f"onto {job.target.label} the end-to-end stage tunes the block scales and norms "
                                  f"only; drop --opt {moved[0]}")
            return
        s = job.scheme
        if s.input_activations is not None or s.type != "int":
            raise SchemeError(f"{name}'s end-to-end stage tunes integer weight-only grids; drop --opt e2e_steps")
        if o.e2e_rounding_lr and s.rotation is not None:
            raise SchemeError(f"{name}'s end-to-end rounding starts from the float model's weights, which --rotate "
                              "changes; drop --opt e2e_rounding_lr or --rotate")
        if getattr(o, "offload", "none") == "disk":
            raise SchemeError(f"{name}'s end-to-end stage needs the model in memory; drop --offload disk or set "
                              "--opt e2e_steps=0")

    def prepare(self, job: QuantJob) -> QuantJob:
        self.check_end_to_end(job)
        return super().prepare(job)  # type: ignore[misc]

    def plan_settings(self, job: QuantJob) -> dict[str, Any]:
        out = super().plan_settings(job)  # type: ignore[misc]
        if job.options.e2e_steps:
            out["e2e_windows"] = job.options.e2e_batch_size
            out["e2e_embedding"] = job.options.e2e_embedding_lr > 0
            out["e2e_headers"] = job.target is not None
        return out

    def e2e_compile(self, job: QuantJob, spec: ArchSpec) -> bool:
        """Whether the stage's KL is compiled: where a compiler is found, and not for MoE models (their routed
        shapes change every step)."""
        return can_compile(job.device) and spec.moe is None

    def quantize_loaded(self, loaded: Loaded, job: QuantJob, samples: Tensor | None, facts: RunFacts) -> dict[str, Any]:
        if not job.options.e2e_steps:
            return super().quantize_loaded(loaded, job, samples, facts)  # type: ignore[misc]
        if samples is None and loaded.tokenizer is not None:
            samples = self.calibration(loaded.tokenizer, job)  # type: ignore[attr-defined]
        results = super().quantize_loaded(loaded, job, samples, facts)  # type: ignore[misc]
        if job.target is not None:
            return self._tune_target(loaded, job, samples, results)
        quantized = stored_results(loaded, job, results, self.job_format(job),  # type: ignore[attr-defined]
                                   self.describe(job).get("options", {}))  # type: ignore[attr-defined]
        p = e2e_params(job, self.e2e_compile(job, loaded.spec))
        teacher = self._teacher(loaded, job, samples, p, quantized if p.rounding_lr > 0 else ())
        out = tune_end_to_end(loaded.model, teacher, quantized, samples, p)
        loaded.model.to("cpu")
        return {n: q.to("cpu") for n, q in out.items()}

    @staticmethod
    def _teacher(loaded: Loaded, job: QuantJob, samples: Tensor, p: E2EParams, weights: Any = ()) -> Any:
        """The model moved to the job's device and the float model's side of the loss on `samples`; the float
        model is loaded again for it and freed (its hidden states and head are all the tuning reads of it)."""
        place_outside_blocks(loaded.model, loaded.spec, job.device)
        loaded.model.to(job.device)
        base, _ = load_model(job.source, torch.float32, job.trust_remote_code, loaded.tokenizer)
        return teacher_of(base.to(job.device), loaded.model, samples, p, weights)

    def _tune_target(self, loaded: Loaded, job: QuantJob, samples: Tensor, results: dict[str, Any]) -> dict[str, Any]:
        """The stage onto `job.target`'s blocks: `results` are each Linear's bytes; the decoder Linears' block
        scales and mins are tuned, the output head (when rounded onto its grid) computes as its bytes decode."""
        target: GridTarget = job.target  # type: ignore[assignment]
        lr = e2e_lr(job)
        if lr >= 1e-4:
            log.warning("e2e_lr %g on %s's block headers: from 1e-4 up the stage raised the KL on SmolLM2 q5_k_m "
                        "(benchmarks/results/gguf.md, session 21); the default is %g", lr, target.label, HEADER_LR)
        prefix = f"{loaded.model.base_model_prefix}."
        head = loaded.model.get_output_embeddings()
        parts = {}
        for n, data in results.items():
            codec = target.codecs.get(n)
            module = loaded.model.get_submodule(n) if codec is not None else None
            if module is None or not hasattr(module, "weight"):
                continue
            a, b = codec.parts(data, module.weight.shape[1])
            d, m = codec.scales(data)
            x = HeaderParts(*(None if v is None else torch.from_numpy(v)  # type: ignore[arg-type]
                              for v in (a, b, d, m)))
            if module.weight is head.weight:  # the head (tied or not) as the file's bytes give it
                module.weight.data.copy_(x.weight().to(module.weight.dtype))
            elif n.startswith(prefix) and isinstance(module, torch.nn.Linear):
                parts[n] = x
        p = e2e_params(job, self.e2e_compile(job, loaded.spec))
        tuned = tune_headers(loaded.model, self._teacher(loaded, job, samples, p), parts, samples, p)
        loaded.model.to("cpu")
        out = dict(results)
        for n, (d, m) in tuned.items():
            out[n] = target.codecs[n].with_scales(results[n], d.numpy(), None if m is None else m.numpy())
        return out

    def artifact(self, job: QuantJob, loaded: Loaded, results: dict[str, QuantizedWeight],
                 extra: dict[str, Any]) -> Any:
        art = super().artifact(job, loaded, results, extra)  # type: ignore[misc]
        if job.options.e2e_steps:
            art.stored = None  # every block's tuned tensors are in `results` and the model
        return art

    def encoded_artifact(self, job: QuantJob, loaded: Loaded, results: dict[str, Any],
                         extra: dict[str, Any]) -> EncodedArtifact:
        """A run onto `job.target`: its bytes, and the norms when the stage tuned them."""
        floats = ({n: w.detach().to("cpu", torch.float32).clone() for n, w in norm_params(loaded.model).items()}
                  if job.options.e2e_steps else {})
        return EncodedArtifact(encoded=results, extra=extra, floats=floats)


def without_unused_e2e(options: dict[str, Any]) -> dict[str, Any]:
    """An options record without the stage's fields when the stage is off (a method that gained the stage
    records what it did before)."""
    if options.get("e2e_steps"):
        return options
    return {k: v for k, v in options.items() if k not in E2E_FIELDS}


def record_e2e_lr(options: dict[str, Any], job: QuantJob) -> dict[str, Any]:
    """An options record with `e2e_lr` as the stage resolved it (where the record keeps the field)."""
    if "e2e_lr" in options:
        options["e2e_lr"] = e2e_lr(job)
    return options
