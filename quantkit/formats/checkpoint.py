"""Writing packed checkpoints: safetensors weights, config.json with quantization_config,
format side files, tokenizer, generation config and quantkit.json provenance.

Output is deterministic: the same model and codes give byte-identical files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from quantkit.errors import CheckpointError
from quantkit.formats.specs import get_format
from quantkit.grid import QuantizedWeight
from quantkit.scheme import QuantScheme
from quantkit.version import __version__

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
PROVENANCE = "quantkit.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def float_state_dict(model: nn.Module, skip_modules: set[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's tensors outside `skip_modules`, floats cast to `dtype`, tied aliases dropped."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] in skip_modules:
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:  # tied weights (lm_head <- embed_tokens): transformers re-ties on load
            continue
        seen.add(key)
        out[name] = (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
    return out


def check_finite(tensors: dict[str, Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor {name} holds NaN or Inf; refusing to write a broken checkpoint")


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

    def tensors(self) -> dict[str, Tensor]:
        layout = get_format(self.fmt).read(self.quantization_config())[0]
        sd = float_state_dict(self.model, set(self.quantized), self.save_dtype)
        for name, qw in self.quantized.items():
            for k, v in layout.pack(qw).items():
                sd[f"{name}.{k}"] = v.cpu().contiguous()
            if qw.bias is not None:
                sd[f"{name}.bias"] = qw.bias.to(torch.float16).cpu()
        return sd

    def quantization_config(self) -> dict[str, Any]:
        return get_format(self.fmt).quantization_config(self.scheme, self.extra.get("options", {}))

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        sd = self.tensors()
        check_finite(sd)
        save_file(sd, folder / WEIGHTS, metadata={"format": "pt"})
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
            "quantized_modules": len(self.quantized),
            **self.extra,
        })


def save_tokenizer_and_generation(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
