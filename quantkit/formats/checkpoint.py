"""Writing packed checkpoints: safetensors weights (sharded, streamed), config.json with
quantization_config, format side files, tokenizer, generation config and quantkit.json provenance.

Output is deterministic: the same model and codes give byte-identical files. Weights are
written one tensor at a time (`quantkit.formats.shards`): the in-memory model's float tensors,
codes still held in memory (RTN), and blocks a calibrated run already stored on disk
(`StoredTensors`, the run's work folder) are all just entries of one plan.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from quantkit.errors import CheckpointError
from quantkit.formats.shards import DEFAULT_MAX_SHARD_SIZE, WEIGHTS, Entry, natural_key, write_shards
from quantkit.formats.specs import get_format
from quantkit.grid import QuantizedWeight
from quantkit.models.moe import to_hub_names
from quantkit.scheme import QuantScheme
from quantkit.version import __version__

log = logging.getLogger(__name__)

PROVENANCE = "quantkit.json"
__all__ = ["WEIGHTS", "PROVENANCE", "PackedArtifact", "StoredTensors", "write_json", "check_finite"]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()


def float_entries(model: nn.Module, skip_modules: set[str], dtype: torch.dtype,
                  skip_prefixes: tuple[str, ...] = ()) -> list[Entry]:
    """The model's tensors outside `skip_modules` and `skip_prefixes`, floats as `dtype`, tied aliases dropped.

    Each entry casts its tensor only when written (one tensor of `dtype` at a time).
    """
    out: list[Entry] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] in skip_modules or name.startswith(skip_prefixes):
            if name.rsplit(".", 1)[0] in skip_modules and not t.is_meta:  # its tied aliases (lm_head) are not written
                seen.add((t.data_ptr(), tuple(t.shape)))
            continue
        if t.is_meta:
            raise CheckpointError(f"tensor {name} was never loaded (meta); cannot write it")
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:  # tied weights (lm_head <- embed_tokens): transformers re-ties on load
            continue
        seen.add(key)
        out.append(Entry(name, dtype if t.is_floating_point() else t.dtype, tuple(t.shape),
                         lambda t=t: _cast(t, dtype)))
    return out


def float_state_dict(model: nn.Module, skip_modules: set[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's tensors outside `skip_modules`, floats cast to `dtype`, tied aliases dropped."""
    return {e.name: e.load() for e in float_entries(model, skip_modules, dtype)}


def packed_entries(quantized: dict[str, QuantizedWeight], layout: Any) -> list[Entry]:
    """The format tensors of in-memory quantized Linears; each Linear is packed once, when first needed."""
    out: list[Entry] = []
    for name, qw in quantized.items():
        out_f, in_f = qw.shape
        parts: dict[str, Tensor] = {}

        def load(key: str, qw: QuantizedWeight = qw, parts: dict[str, Tensor] = parts) -> Tensor:
            if not parts:
                parts.update(layout.pack(qw))
            return parts.pop(key).cpu().contiguous()

        for key, (shape, dtype) in layout.shapes(out_f, in_f, qw.bits, qw.group_size).items():
            out.append(Entry(f"{name}.{key}", dtype, tuple(shape), lambda key=key, load=load: load(key)))
        if qw.bias is not None:
            out.append(Entry(f"{name}.bias", torch.float16, tuple(qw.bias.shape),
                             lambda qw=qw: qw.bias.to(torch.float16).cpu().contiguous()))
    return out


def check_finite(tensors: dict[str, Tensor]) -> None:
    for name, t in tensors.items():
        check_finite_one(name, t)


def check_finite_one(name: str, t: Tensor) -> None:
    if t.is_floating_point() and t.dtype.itemsize == 1:
        t = t.float()  # FP8 has no isfinite of its own
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"tensor {name} holds NaN or Inf; refusing to write a broken checkpoint")


class StoredTensors(Protocol):
    """Checkpoint tensors a run already wrote elsewhere (the work folder's finished blocks)."""

    n_quantized: int                                 # quantized Linears among them

    def prefixes(self) -> tuple[str, ...]: ...       # module prefixes ("model.layers.3.") whose tensors it holds
    def entries(self) -> list[Entry]: ...           # those tensors, read back one at a time


@dataclass
class PackedArtifact:
    """A model whose target Linears have been quantized, ready to be written in `fmt`."""

    model: nn.Module
    tokenizer: Any
    quantized: dict[str, QuantizedWeight]
    scheme: QuantScheme
    fmt: str
    method: str
    save_dtype: torch.dtype = torch.float16
    extra: dict[str, Any] = field(default_factory=dict)
    stored: StoredTensors | None = None  # blocks already written by the run (their tensors are not in `model`)
    # a quantized KV cache (scheme.kv_cache): calibrated (k_scale, v_scale) per attention module, set before save
    kv_scales: dict[str, tuple[Tensor, Tensor]] | None = None
    # a quantized token embedding (scheme.embedding): module name -> its codes; a tied lm_head is not written
    embeddings: dict[str, QuantizedWeight] = field(default_factory=dict)

    def entries(self) -> list[Entry]:
        """Every output tensor, in model order (embeddings, block 0, block 1, ..., head)."""
        qc = self.quantization_config()
        layout = get_format(self.fmt).read(qc)[0]
        prefixes = self.stored.prefixes() if self.stored is not None else ()
        entries = float_entries(self.model, set(self.quantized) | set(self.embeddings), self.save_dtype, prefixes)
        entries += packed_entries(self.quantized, layout)
        if self.embeddings:
            entries += packed_entries(self.embeddings, get_format(self.fmt).embedding_layout(qc))
        if self.stored is not None:
            entries += self.stored.entries()
        entries += self.kv_entries()
        # MoE: per-expert tensors under the hub's names (Mixtral: block_sparse_moe.experts.{e}.w1, ...)
        entries = [replace(e, name=name) for name, e in to_hub_names(self.model, {e.name: e for e in entries}).items()]
        return sorted(entries, key=lambda e: natural_key(e.name))

    def kv_entries(self, required: bool = False) -> list[Entry]:
        """`<attention>.k_scale` / `.v_scale` (shape (1,), the save dtype), as llm-compressor writes them."""
        if self.scheme.kv_cache is None:
            return []
        if self.kv_scales is None:
            if required:
                raise CheckpointError("a quantized KV cache needs its calibrated scales before the checkpoint is written")
            return []
        out = []
        for name, pair in self.kv_scales.items():
            for key, t in zip(("k_scale", "v_scale"), pair):
                out.append(Entry(f"{name}.{key}", self.save_dtype, (1,),
                                 lambda t=t: t.detach().reshape(1).to(self.save_dtype).cpu().contiguous()))
        return out

    def tensors(self) -> dict[str, Tensor]:
        """All output tensors in memory at once (small models and tests; `save` streams them)."""
        return {e.name: e.load() for e in self.entries()}

    def quantization_config(self) -> dict[str, Any]:
        extra = self.extra.get("options", {})
        if self.embeddings:  # the other Embedding modules (positions) stay float: the `Embedding` group skips them
            others = [n for n, m in self.model.named_modules() if isinstance(m, nn.Embedding) and n not in self.embeddings]
            extra = {**extra, "ignore": ["lm_head", *others]}
        return get_format(self.fmt).quantization_config(self.scheme, extra)

    def save(self, folder: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
        """Write the checkpoint into `folder` (an empty temporary folder: `paths.atomic_dir`)."""
        folder = Path(folder)
        self.kv_entries(required=True)
        files = write_shards(folder, self.entries(), max_shard_size, check=check_finite_one)
        if len(files) > 1:
            log.info("wrote %d weight shards of at most %d bytes", len(files), max_shard_size)
        qc = self.quantization_config()
        config = self.model.config.to_dict()
        config["quantization_config"] = qc
        config["dtype"] = str(self.save_dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        write_json(folder / "config.json", config)
        for fname, data in get_format(self.fmt).side_files(qc).items():
            write_json(folder / fname, data)
        save_tokenizer_and_generation(self.model, self.tokenizer, folder)
        write_json(folder / PROVENANCE, {
            "quantkit_version": __version__,
            "method": self.method,
            "format": self.fmt,
            "scheme": self.scheme.model_dump(mode="json"),
            "quantized_modules": len(self.quantized) + (self.stored.n_quantized if self.stored is not None else 0),
            **({"quantized_embeddings": sorted(self.embeddings)} if self.embeddings else {}),
            **self.extra,
        })


def save_tokenizer_and_generation(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
