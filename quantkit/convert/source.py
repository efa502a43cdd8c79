"""A conversion source: its format name, config, scheme and lazily read tensors.

Format names used by the conversion table:
    hf                  plain float folder (safetensors)
    gptq, gptq-v2       GPTQ, checkpoint_format "gptq" (zeros stored minus one) or "gptq_v2"
    awq                 AutoAWQ GEMM
    compressed-tensors  compressed-tensors pack-quantized
    gguf                a .gguf file
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from quantkit.errors import CheckpointError, ModelSourceError
from quantkit.formats.compressed_tensors import embedding_grid
from quantkit.formats.layouts import Layout
from quantkit.formats.loader import weight_files
from quantkit.formats.specs import detect_format
from quantkit.grid import QuantizedWeight
from quantkit.models.sources import ModelSource, read_config, resolve
from quantkit.scheme import QuantScheme
from quantkit.convert.stream import TensorInfo, read_tensor, scan

log = logging.getLogger(__name__)

FORMAT_NAMES = ("hf", "gptq", "gptq-v2", "awq", "compressed-tensors", "gguf")
PACKED = ("gptq", "gptq-v2", "awq", "compressed-tensors")


def format_of(qc: dict[str, Any] | None) -> str:
    """The conversion-table name of a folder's format, from its quantization_config (None = plain float)."""
    if qc is None:
        return "hf"
    fmt = detect_format(qc)
    if fmt is None:
        raise ModelSourceError(f"quantization method {qc.get('quant_method')!r} cannot be converted; "
                               f"sources are: {', '.join(FORMAT_NAMES)}")
    if fmt.name == "gptq":
        return "gptq-v2" if qc.get("checkpoint_format") == "gptq_v2" else "gptq"
    if fmt.name == "compressed-tensors" and qc.get("format") != "pack-quantized":
        raise ModelSourceError(f"compressed-tensors {qc.get('format')} checkpoints (8-bit weights with quantized "
                               f"activations, W8A8 / FP8) have no weight-only equivalent to convert to; serve them as "
                               f"they are (vLLM, quantkit.load) or quantize the float model again")
    return fmt.name


def linear_dims(fmt: str, shapes: dict[str, tuple[int, ...]], bits: int) -> tuple[int, int]:
    """(out_features, in_features) of a packed Linear from its tensor shapes alone (no data read)."""
    if fmt in ("gptq", "gptq-v2"):
        return shapes["scales"][1], shapes["g_idx"][0]
    if fmt == "awq":
        return shapes["scales"][1], shapes["qweight"][0]
    if fmt == "compressed-tensors":
        out_f, words = shapes["weight_packed"]
        return out_f, words * 32 // bits
    raise ValueError(fmt)


@dataclass
class Checkpoint:
    """A safetensors folder opened for streaming conversion."""

    source: ModelSource
    folder: Path
    config: dict[str, Any]
    fmt: str
    infos: dict[str, TensorInfo]
    layout: Layout | None = None
    scheme: QuantScheme | None = None
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # packed Linear -> (out, in)

    @property
    def qc(self) -> dict[str, Any] | None:
        return self.config.get("quantization_config")

    def tensor(self, name: str) -> Tensor:
        return read_tensor(self.infos[name], name)

    def linear_tensors(self, name: str) -> dict[str, Tensor]:
        assert self.layout is not None and self.scheme is not None
        out_f, in_f = self.linears[name]
        want = self.layout.shapes(out_f, in_f, self.scheme.bits, self.scheme.group_size)
        return {k: self.tensor(f"{name}.{k}") for k in want}

    def quantized(self, name: str) -> QuantizedWeight:
        """One packed Linear as a format-free QuantizedWeight (bias included)."""
        assert self.layout is not None and self.scheme is not None
        qw = self.layout.unpack(self.linear_tensors(name), self.scheme.bits, self.scheme.group_size, self.scheme.sym)
        if f"{name}.bias" in self.infos:
            qw.bias = self.tensor(f"{name}.bias").float()
        return qw

    def owned_by_linear(self, tensor_name: str) -> str | None:
        """The packed Linear a tensor belongs to (its bias included), or None for a plain tensor."""
        mod = tensor_name.rsplit(".", 1)[0]
        return mod if mod in self.linears else None


def open_checkpoint(src: str | Path) -> Checkpoint:
    source = resolve(src)
    if source.kind != "folder":
        raise ModelSourceError(f"{src} is not a local folder; streaming conversion reads safetensors folders")
    folder = Path(source.path)
    config = read_config(folder)
    qc = config.get("quantization_config")
    fmt = format_of(qc)
    infos = scan(weight_files(folder))
    ck = Checkpoint(source, folder, config, fmt, infos)
    if fmt in PACKED:
        if fmt == "compressed-tensors" and embedding_grid(qc) is not None:
            raise CheckpointError(f"{folder}: its token embedding is stored quantized (an Embedding config group); "
                                  "quantkit convert reads checkpoints with a float embedding only")
        if qc.get("dynamic"):  # the streaming converters read one grid for every Linear
            raise CheckpointError(f"{folder}: its Linears are stored on per-module grids (GPTQ `dynamic` config); "
                                  "conversion reads one grid for all: quantize the float model to the target instead")
        spec = detect_format(qc)
        layout, scheme = spec.read(qc)
        ck.layout, ck.scheme = layout, scheme
        marker = "." + getattr(layout, "marker", "qweight")
        for name in sorted({k.rsplit(".", 1)[0] for k in infos if k.endswith(marker)}):
            shapes = {k.rsplit(".", 1)[1]: v.shape for k, v in infos.items() if k.rsplit(".", 1)[0] == name}
            try:
                out_f, in_f = linear_dims(fmt, shapes, scheme.bits)
            except KeyError as e:
                raise CheckpointError(f"{folder}: packed Linear {name} has no {e.args[0]} tensor") from None
            want = layout.shapes(out_f, in_f, scheme.bits, scheme.group_size)
            for k, (shape, _) in want.items():
                if k not in shapes:
                    raise CheckpointError(f"{folder}: packed Linear {name} has no {k} tensor")
                if tuple(shapes[k]) != tuple(shape):
                    raise CheckpointError(f"{folder}: {name}.{k} has shape {tuple(shapes[k])}, expected {tuple(shape)}")
            ck.linears[name] = (out_f, in_f)
        if not ck.linears:
            raise CheckpointError(f"{folder}: quantization_config says {fmt} but no packed Linear was found")
    return ck


def copy_side_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Tokenizer, chat template, generation config, license and model card: everything but weights and configs."""
    import shutil

    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in skip or f.suffix == ".safetensors" or f.name.startswith("."):
            continue
        if f.suffix in (".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def float_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ModelSourceError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return table[name]
