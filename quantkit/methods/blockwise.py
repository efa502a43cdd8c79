"""Calibrated methods: one path for every method that quantizes block by block on calibration text.

The pipeline side (this base, `quantkit.calib.pipeline.run_sequential`) owns the calibration samples,
the loop over blocks, the work folder and resume, `--offload disk`, MoE expert coverage and progress.
A method contributes `block_step(job, spec, coverage)`: a function of one block (`BlockCalib`) and the
names of its Linears to quantize (relative to the block) that returns their quantized weights and any
side data, leaving the block computing with its quantized weights. Nothing of a run is kept on the
method: what a run learned for its checkpoint record comes back as `RunFacts`.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from quantkit.calib.data import calibration_samples, fingerprint
from quantkit.calib.heap import release_heap
from quantkit.calib.pipeline import BlockCalib, run_sequential
from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint import PackedArtifact
from quantkit.grid import QuantizedWeight
from quantkit.methods.base import Loaded, QuantJob, RunFacts, WeightOnlyMethod, load_in_memory, load_offloaded
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage

log = logging.getLogger(__name__)

BlockStep = Callable[[BlockCalib, set[str]], dict[str, Any]]  # (block, relative target names) -> results


class RunOptions(BaseModel):
    """Options of the calibration run itself, shared by every block-wise method."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    offload: Literal["none", "disk"] = Field("none", description="disk: load decoder blocks one at a time from safetensors")
    moe_calibration: Literal["routed", "all"] = Field(
        "routed", description="MoE experts: routed = the router's tokens; all = every token (outputs stay routed)")
    moe_min_tokens: int = Field(16, ge=0, description="an expert that saw fewer calibration tokens gets RTN")


def relative(names: set[str], spec: ArchSpec, i: int) -> set[str]:
    """The names in `names` under block i, relative to it."""
    prefix = f"{spec.blocks}.{i}."
    return {n.removeprefix(prefix) for n in names if n.startswith(prefix)}


def early_samples(method: BlockwiseMethod, job: QuantJob) -> tuple[Tensor | None, Any]:
    """Tokenizing the calibration corpus is the largest transient of a run (~600 MB for wiki-vital): a method
    that `tokenizes_first` does it before the model is in memory (folder sources), then frees the heap.
    Returns (samples, the tokenizer) or (None, None); the model's loading reuses that tokenizer (reading Gemma 3's
    a second time cost ~4 CPU s)."""
    if not method.tokenizes_first or job.source.kind != "folder":
        return None, None
    from quantkit.models.sources import _load_tokenizer

    tok = _load_tokenizer(job.source.path, job.trust_remote_code)
    if tok is None:
        return None, None
    samples = method.calibration(tok, job)
    release_heap()
    return samples, tok


class BlockwiseMethod(WeightOnlyMethod):
    """A calibrated weight-only method: `block_step` per decoder block, over the shared pipeline."""

    needs_calibration: ClassVar[bool] = True
    resumable: ClassVar[bool] = True
    Options: ClassVar[type[BaseModel]] = RunOptions
    tokenizer_hint: ClassVar[str] = ""  # appended to the "needs a tokenizer" error
    # the pipeline also carries the float model's hidden states: each block sees the float block's inputs and
    # outputs (BlockCalib.reference_inputs / reference_outputs), what a method tunes the quantized block towards
    float_reference: ClassVar[bool] = False

    @abstractmethod
    def block_step(self, job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
        """The function that quantizes one block (see the module docstring)."""

    def prepare(self, job: QuantJob) -> QuantJob:
        """Check the job (and adjust it, e.g. the scheme a method option implies) before anything is loaded."""
        self.check_scheme(job.scheme)
        return job

    def quantize(self, job: QuantJob) -> PackedArtifact:
        job = self.prepare(job)
        samples, tok = early_samples(self, job)
        disk = getattr(job.options, "offload", "none") == "disk"
        loaded = load_offloaded(job) if disk else load_in_memory(job, tok)
        del tok
        facts = RunFacts()
        with loaded.streaming():
            results = self.quantize_loaded(loaded, job, samples, facts)
        return self.artifact(job, loaded, results, self.describe(job, facts))

    def quantize_model(self, model: Any, tokenizer: Any, spec: ArchSpec, layers: dict[str, Any],
                       job: QuantJob) -> dict[str, QuantizedWeight]:
        return self.quantize_loaded(Loaded(model, tokenizer, spec, layers), job, None, RunFacts())

    def quantize_loaded(self, loaded: Loaded, job: QuantJob, samples: Tensor | None,
                        facts: RunFacts) -> dict[str, Any]:
        """Calibrate every block of `loaded` (samples: already tokenized, or None) and return the results."""
        if loaded.tokenizer is None:
            raise QuantkitError(f"{self.name.upper()} needs a tokenizer for calibration; add tokenizer files to the "
                                f"model folder{self.tokenizer_hint}")
        if samples is None:
            samples = self.calibration(loaded.tokenizer, job)
        facts.samples_sha256 = fingerprint(samples)
        o, spec, targets = job.options, loaded.spec, set(loaded.layers)
        cov = facts.coverage = ExpertCoverage(o.moe_calibration, o.moe_min_tokens)
        step = self.block_step(job, spec, cov)
        log.info("%s: %d Linears, %d samples x %d tokens", self.name.upper(), len(targets), len(samples),
                 samples.shape[1])

        def per_block(calib: BlockCalib) -> dict[str, Any]:  # + the block's MoE token counts (kept on resume)
            done = step(calib, relative(targets, spec, calib.index))
            return {**done, **cov.block_results(f"{spec.blocks}.{calib.index}.")}

        results = run_sequential(loaded.model, spec, samples, per_block, device=job.device,
                                 batch_size=job.calib.batch_size, blocks=loaded.blocks, progress=job.progress,
                                 store=self.block_store(job, spec), compute_dtype=getattr(torch, self.calib_dtype(job)),
                                 reference=self.uses_reference(job), autocast=self.stream_autocast(job),
                                 final=self.final_step(job, loaded))
        return self.finish(cov.absorb(results), job)

    def uses_reference(self, job: QuantJob) -> bool:
        """Whether the pipeline carries the float model's stream for this job (`float_reference`, or an option)."""
        return self.float_reference

    def final_step(self, job: QuantJob, loaded: Loaded) -> Callable[[list[Tensor]], dict[str, Any]] | None:
        """What runs on the last block's outputs (`run_sequential`'s `final`, e.g. rounding the head); None."""
        return None

    def stream_autocast(self, job: QuantJob) -> torch.dtype | None:
        """Autocast dtype of the pipeline's own passes through each block (None: the blocks' dtype)."""
        return None

    def finish(self, results: dict[str, Any], job: QuantJob) -> dict[str, QuantizedWeight]:
        """The quantized weights among a run's results (a method with side data takes it out here)."""
        return results

    def calibration(self, tokenizer: Any, job: QuantJob) -> Tensor:
        """(nsamples, seqlen) token ids of the job's calibration windows."""
        c = job.calib
        return calibration_samples(tokenizer, c.dataset, c.nsamples, c.seqlen, c.seed, c.text_field)
