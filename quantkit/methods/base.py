"""What every method receives (`QuantJob`) and the shared weight-only machinery.

Weight-only methods (RTN, GPTQ, AWQ) only decide integer codes per Linear; the
loading, validation and checkpoint writing around them live here, once.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from quantkit.calib.pipeline import Progress
from quantkit.formats.checkpoint import PackedArtifact
from quantkit.formats.specs import get_format
from quantkit.grid import QuantizedWeight
from quantkit.models.arch import ArchSpec, block_linears, get_arch, get_blocks
from quantkit.models.moe import ExpertCoverage, swap_experts
from quantkit.models.sources import ModelSource, load_model
from quantkit.scheme import QuantScheme

if TYPE_CHECKING:
    from quantkit.calib.workdir import BlockStore, WorkFolder

log = logging.getLogger(__name__)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibSpec(BaseModel):
    """Calibration data: which text, how many windows of how many tokens, which seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str = "wiki-vital"
    text_field: str = "text"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8


@dataclass
class QuantJob:
    source: ModelSource
    scheme: QuantScheme
    options: BaseModel = field(default_factory=NoOptions)
    calib: CalibSpec = field(default_factory=CalibSpec)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    save_dtype: torch.dtype = torch.float16
    trust_remote_code: bool = False
    progress: Progress | None = None
    work: WorkFolder | None = None  # the output's work folder (api.quantize): per-block results and resume


def target_linears(model: nn.Module, spec: ArchSpec, scheme: QuantScheme) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks that the scheme does not skip, by full name."""
    out = {}
    for i, block in enumerate(get_blocks(model, spec)):
        for name, mod in block_linears(block, spec).items():
            full = f"{spec.blocks}.{i}.{name}"
            if not scheme.skips(full):
                out[full] = mod
    return out


class WeightOnlyMethod(ABC):
    """Base for methods that choose integer codes per Linear and write a packed format."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    formats: ClassVar[tuple[str, ...]] = ("gptq",)
    Options: ClassVar[type[BaseModel]] = NoOptions

    def quantize(self, job: QuantJob) -> PackedArtifact:
        model, tok = load_model(job.source, torch.float32, job.trust_remote_code)
        spec = get_arch(model)
        swap_experts(model, spec)  # MoE: fused 3-D experts -> per-expert Linears (a no-op for dense models)
        layers = target_linears(model, spec, job.scheme)
        job.scheme.check_layers({n: (m.out_features, m.in_features) for n, m in layers.items()})
        results = self.quantize_model(model, tok, spec, layers, job)
        return PackedArtifact(model=model, tokenizer=tok, quantized=results, scheme=job.scheme,
                              fmt=self.formats[0], method=self.name, save_dtype=job.save_dtype,
                              extra=self.describe(job), stored=job.work.stored() if job.work else None)

    @abstractmethod
    def quantize_model(self, model: nn.Module, tokenizer: Any, spec: ArchSpec,
                       layers: dict[str, nn.Linear], job: QuantJob) -> dict[str, QuantizedWeight]:
        """Choose the codes of every Linear in `layers` (full name -> module)."""

    resumable: ClassVar[bool] = False  # quantize_model runs `run_sequential` with `block_store(job, spec)`

    def block_store(self, job: QuantJob, spec: ArchSpec) -> BlockStore | None:
        """The job's work folder as `run_sequential`'s store: finished blocks packed in this method's format."""
        if job.work is None:
            return None
        fmt = get_format(self.formats[0])
        layout = fmt.read(fmt.quantization_config(job.scheme, self.describe(job).get("options", {})))[0]
        return job.work.blocks(spec.blocks, layout.pack, job.save_dtype)

    def describe(self, job: QuantJob) -> dict[str, Any]:
        """What the method did, recorded in the checkpoint's quantkit.json."""
        return self.describe_moe({"options": job.options.model_dump()})

    def describe_moe(self, out: dict[str, Any]) -> dict[str, Any]:
        """`out` plus the MoE expert coverage ("moe") of the last calibration, if it reached any expert."""
        cov: ExpertCoverage | None = getattr(self, "coverage", None)
        if cov is not None and (summary := cov.summary()) is not None:
            out["moe"] = summary
        return out
