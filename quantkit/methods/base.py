"""What every method receives (`QuantJob`), what it declares (`MethodBase`), and the shared weight-only
machinery: loading the float model (in memory or block by block from disk) and the one artifact build.

Weight-only methods (RTN, GPTQ, AWQ) only decide integer codes per Linear; the loading,
validation and checkpoint writing around them live here, once.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from quantkit.calib.pipeline import Progress
from quantkit.errors import SchemeError
from quantkit.formats.checkpoint import PackedArtifact
from quantkit.formats.specs import get_format
from quantkit.grid import QuantizedWeight, quantize_weight
from quantkit.models.arch import ArchSpec, blocks_linears, get_arch
from quantkit.models.moe import ExpertCoverage, swap_experts
from quantkit.models.rotation import rotate_model
from quantkit.models.sources import ModelSource, load_model
from quantkit.plan import BlockWork, Geometry, Settings
from quantkit.scheme import QuantScheme

if TYPE_CHECKING:
    from quantkit.calib.offload import DiskBlocks
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
class GridTarget:
    """A block format that a method rounds onto instead of its own grid, handed in by the caller (the API
    builds GGUF's from quantkit.convert.ggml_grid). `codecs`: full Linear name -> codec, with `block` (inputs
    per grid), `name`, and `fit(x (rows, block), importance (block,), row_sigma2 (rows,))` -> a grid with
    `round(k, column)` -> (codes, values) and `pack(codes (rows, block))` -> the block's bytes (rows, bytes); for
    the end-to-end stage, `scales(data)` -> the float block scales and mins (rows, blocks), `parts(data, n)` ->
    per-weight (a, b) with value = scale * a + min * b, and `with_scales(data, d, m)` -> the bytes with new ones.
    Linears without a codec stay float. `label`: what the record calls the target (e.g. "gguf q4_k_m"); `mix`: the
    llama.cpp mix the codecs come from (GGUF's --type, e.g. "q4_k_m"), for options whose default depends on it."""

    codecs: dict[str, Any]
    label: str
    mix: str | None = None


@dataclass
class EncodedArtifact:
    """A run onto a `GridTarget`: each Linear's bytes (full name -> (out, row bytes) uint8), for the caller's writer;
    `floats`: float tensors the run changed (the norms, tuned end to end), which the writer takes instead of the
    source's."""

    encoded: dict[str, Any]
    extra: dict[str, Any]
    floats: dict[str, Any] = field(default_factory=dict)  # tuned float tensors by checkpoint name (norms), or none


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
    target: GridTarget | None = None  # round onto this block format (a method with grid_rounding)
    fmt: str | None = None  # the checkpoint format asked for (--format), when not the method's own


@dataclass
class RunFacts:
    """What one run learned that its checkpoint records (returned by the run, never kept on the method)."""

    samples_sha256: str | None = None
    coverage: ExpertCoverage | None = None


class MethodBase(ABC):
    """The `quantkit.registry.Method` protocol with its defaults. A method declares what it needs as
    class-level data; the plan, the memory check, the CLI and the zoo read these, never its name."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    formats: ClassVar[tuple[str, ...]] = ("gptq",)
    uses_scheme: ClassVar[bool] = True
    scheme_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    quantizes_on_load: ClassVar[bool] = False
    resumable: ClassVar[bool] = False
    tokenizes_first: ClassVar[bool] = False
    replaces_weights: ClassVar[bool] = False
    card_tags: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[BaseModel]] = NoOptions
    # writes weight-and-activation schemes (W8A8, FP8: compressed-tensors int-/float-quantized) as well
    activation_schemes: ClassVar[bool] = False
    # measures static activation scales (a calibrated method) for w8a8-static / fp8
    static_activations: ClassVar[bool] = False
    # can round onto a caller's block format (QuantJob.target: GGUF's types) and return EncodedArtifact
    grid_rounding: ClassVar[bool] = False
    # quantizes each Linear on its own grid where the scheme overrides it (QuantScheme.overrides)
    module_grids: ClassVar[bool] = False

    def calib_dtype(self, job: QuantJob) -> str:
        """The dtype blocks compute in while calibrated (float32 unless the method has a policy)."""
        return "float32"

    @classmethod
    def block_memory(cls, geometry: Geometry, settings: Settings) -> BlockWork:
        """The method's own memory while one block is calibrated (nothing beyond the pipeline's)."""
        return BlockWork()

    def plan_settings(self, job: QuantJob) -> dict[str, Any]:
        """`quantkit.plan.Settings` fields this job's options move (beyond the scheme's and the calibration's)."""
        return {}

    def check_scheme(self, scheme: QuantScheme) -> None:
        if self.uses_scheme and scheme.bits not in self.scheme_bits:
            raise SchemeError(f"{self.name} stores {', '.join(map(str, self.scheme_bits))}-bit weights, "
                              f"got --bits {scheme.bits}")
        if scheme.overrides:
            if not self.module_grids or self.output_format(scheme) != "gptq":
                raise SchemeError(f"{self.name} quantizes every Linear on one grid; per-module grids "
                                  f"(--target-bpw) need a method that writes them in the GPTQ format")
            odd = sorted({g.bits for g in scheme.overrides.values()} - set(self.scheme_bits))
            if odd:
                raise SchemeError(f"{self.name} stores {', '.join(map(str, self.scheme_bits))}-bit weights, "
                                  f"a per-module grid has {odd[0]} bits")
        special = scheme.input_activations is not None or scheme.type != "int" or scheme.strategy is not None
        if special and not self.activation_schemes:
            raise SchemeError(f"{self.name} writes weight-only checkpoints; 8-bit activation and FP8 schemes "
                              f"need --method rtn, gptq or smoothquant")
        if scheme.activation_static and not self.static_activations:
            raise SchemeError(f"{self.name} has no calibration data to measure static activation scales; use "
                              f"--method gptq or smoothquant (or a dynamic preset: w8a8, fp8-dynamic)")

    def output_format(self, scheme: QuantScheme) -> str:
        """The checkpoint format a run with `scheme` writes: compressed-tensors for activation and FP8 schemes
        (int-quantized / float-quantized, what vLLM serves), else the method's own."""
        special = scheme.input_activations is not None or scheme.type != "int" or scheme.strategy is not None
        return "compressed-tensors" if special else self.formats[0]

    def job_format(self, job: QuantJob) -> str:
        """The format this job writes: the one asked for (one of the method's `formats`), else `output_format`."""
        return job.fmt or self.output_format(job.scheme)

    def check_format(self, scheme: QuantScheme, fmt: str | None) -> str:
        """The format a run with `scheme` and `--format fmt` writes, or a one-line refusal."""
        native = self.output_format(scheme)
        if fmt is not None and fmt != native and (fmt not in self.formats or native != self.formats[0]):
            raise SchemeError(f"--format {fmt}: {self.name} writes {', '.join(dict.fromkeys((native, *self.formats)))}, "
                              "or gguf where the method rounds onto GGUF's grid")
        out = fmt or native
        if scheme.embedding is not None and out != "compressed-tensors":
            hint = ("add --format compressed-tensors" if "compressed-tensors" in self.formats
                    else "use --method rtn, gptq or signround with --format compressed-tensors")
            raise SchemeError(f"--embedding {scheme.embedding}: {out} checkpoints cannot hold a quantized embedding; {hint}")
        return out

    @abstractmethod
    def quantize(self, job: QuantJob) -> Any:
        """An artifact with `save(folder, max_shard_size)`."""


def target_linears(model: nn.Module, spec: ArchSpec, scheme: QuantScheme) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks that the scheme does not skip, by full name."""
    return blocks_linears(model, spec, scheme.skips)


@dataclass
class Loaded:
    """The float model to quantize, its tokenizer, and the Linears the scheme quantizes.

    `blocks`: with `--offload disk`, the source that reads each block from the shards (the model then
    holds no block weights until the pipeline asks for one)."""

    model: nn.Module
    tokenizer: Any
    spec: ArchSpec
    layers: dict[str, nn.Linear]
    blocks: DiskBlocks | None = None

    @contextmanager
    def streaming(self) -> Iterator[None]:
        with self.blocks.streaming() if self.blocks is not None else nullcontext():
            yield


def input_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """The token embedding's module name and module."""
    emb = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if name is None or not isinstance(emb, nn.Embedding):
        raise SchemeError(f"--embedding: {type(model).__name__} has no nn.Embedding token embedding to quantize")
    return name, emb


def check_embedding(model: nn.Module, scheme: QuantScheme) -> None:
    """Refuse an embedding grid that does not fit the table (vocab, hidden) before any work."""
    if scheme.embedding_grid is None:
        return
    bits, group_size, sym = scheme.embedding_grid
    name, emb = input_embedding(model)
    vocab, hidden = emb.weight.shape
    if hidden % 32 or (group_size > 0 and hidden % group_size):
        raise SchemeError(f"--embedding {scheme.embedding}: hidden size {hidden} of {name} is not a multiple of "
                          f"{max(32, group_size)}; use --embedding int8 (per row) or another --group-size")
    if not sym and vocab * bits % 32:
        raise SchemeError(f"--embedding {scheme.embedding}: the asymmetric zero points of {vocab} rows do not pack "
                          "into int32; use --sym or --embedding int8")


def quantize_embedding(model: nn.Module, scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """The token embedding on the scheme's embedding grid, round-to-nearest (data-free), by module name."""
    if scheme.embedding_grid is None:
        return {}
    bits, group_size, sym = scheme.embedding_grid  # the grid fits the table: checked at load (`_checked`)
    name, emb = input_embedding(model)
    return {name: quantize_weight(emb.weight, bits, group_size, sym)}


def _checked(model: nn.Module, tokenizer: Any, spec: ArchSpec, scheme: QuantScheme) -> Loaded:
    layers = target_linears(model, spec, scheme)
    scheme.check_layers({n: (m.out_features, m.in_features) for n, m in layers.items()})
    check_embedding(model, scheme)
    return Loaded(model, tokenizer, spec, layers)


def load_in_memory(job: QuantJob, tokenizer: Any = None) -> Loaded:
    """The whole model in memory; `tokenizer`: the source's, when the caller already loaded it."""
    model, tok = load_model(job.source, torch.float32, job.trust_remote_code, tokenizer)
    spec = get_arch(model)
    swap_experts(model, spec)  # MoE: fused 3-D experts -> per-expert Linears (a no-op for dense models)
    if job.scheme.rotation is not None:  # fused into the weights before any method sees them
        rotate_model(model, spec, job.scheme.rotation, job.calib.seed)
    return _checked(model, tok, spec, job.scheme)


def load_offloaded(job: QuantJob) -> Loaded:
    """The skeleton (every tensor outside the blocks) and a `DiskBlocks` source for the blocks."""
    from quantkit.calib.offload import disk_blocks, offload_skeleton

    if job.scheme.rotation is not None:
        raise SchemeError("--rotate needs the whole model in memory (it rotates every block, the embedding and the "
                          "head together); drop --opt offload=disk")

    model, tok, spec, index = offload_skeleton(job.source, job.trust_remote_code)
    loaded = _checked(model, tok, spec, job.scheme)
    # finished blocks live in the work folder: then all of a block's weights are freed after it
    loaded.blocks = disk_blocks(model, spec, index, set(loaded.layers), keep_nothing=job.work is not None)
    return loaded


class WeightOnlyMethod(MethodBase):
    """Base for methods that choose integer codes per Linear and write a packed format."""

    def quantize(self, job: QuantJob) -> PackedArtifact:
        self.check_scheme(job.scheme)
        loaded = load_in_memory(job)
        results = self.quantize_model(loaded.model, loaded.tokenizer, loaded.spec, loaded.layers, job)
        return self.artifact(job, loaded, results, self.describe(job))

    def artifact(self, job: QuantJob, loaded: Loaded, results: dict[str, QuantizedWeight],
                 extra: dict[str, Any]) -> PackedArtifact:
        """The one artifact build of every weight-only run, in memory or offloaded."""
        self.check_format(job.scheme, job.fmt)  # a job built without api.quantize: an embedding needs its format
        return PackedArtifact(model=loaded.model, tokenizer=loaded.tokenizer, quantized=results, scheme=job.scheme,
                              fmt=self.job_format(job), method=self.name, save_dtype=job.save_dtype, extra=extra,
                              stored=job.work.stored() if job.work else None,
                              embeddings=quantize_embedding(loaded.model, job.scheme))

    @abstractmethod
    def quantize_model(self, model: nn.Module, tokenizer: Any, spec: ArchSpec,
                       layers: dict[str, nn.Linear], job: QuantJob) -> dict[str, QuantizedWeight]:
        """Choose the codes of every Linear in `layers` (full name -> module)."""

    def block_store(self, job: QuantJob, spec: ArchSpec) -> BlockStore | None:
        """The job's work folder as `run_sequential`'s store: finished blocks packed in this method's format."""
        if job.work is None:
            return None
        fmt = get_format(self.job_format(job))
        layout = fmt.read(fmt.quantization_config(job.scheme, self.describe(job).get("options", {})))[0]
        return job.work.blocks(spec.blocks, layout.pack, job.save_dtype)

    def describe(self, job: QuantJob, facts: RunFacts | None = None) -> dict[str, Any]:
        """What the method did, recorded in the checkpoint's quantkit.json."""
        return describe_moe({"options": job.options.model_dump()}, facts)


def describe_moe(out: dict[str, Any], facts: RunFacts | None) -> dict[str, Any]:
    """`out` plus the MoE expert coverage ("moe") of the run, if its calibration reached any expert."""
    cov = facts.coverage if facts is not None else None
    if cov is not None and (summary := cov.summary()) is not None:
        out["moe"] = summary
    return out
