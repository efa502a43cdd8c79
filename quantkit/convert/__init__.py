"""Conversion between model formats. `to_hf` writes a plain float Hugging Face folder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint import save_tokenizer_and_generation
from quantkit.formats.loader import load
from quantkit.models.sources import load_tokenizer, resolve
from quantkit.paths import atomic_dir, check_output

log = logging.getLogger(__name__)

TARGETS = ("hf",)


def to_hf(src: str | Path, out: str | Path, dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    """Any model quantkit reads (GGUF, quantized checkpoint, folder) -> plain safetensors HF folder."""
    out = Path(out)
    check_output(out, force)
    source = resolve(src)
    model = load(src, dtype=dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        model = dequantize_modules(model, dtype)
    tok = load_tokenizer(source)
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer_and_generation(model, tok, tmp)
    return out


def dequantize_modules(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight."""
    from quantkit.formats.qlinear import QuantLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=dtype)
            lin.weight.data = mod.dequantize(dtype)
            if mod.bias is not None:
                lin.bias.data = mod.bias.to(dtype)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, lin)
    return model


def convert(src: str | Path, to: str, out: str | Path, dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    if to not in TARGETS:
        raise QuantkitError(f"unknown target format {to!r}; quantkit convert writes: {', '.join(TARGETS)}")
    return to_hf(src, out, dtype, force)
