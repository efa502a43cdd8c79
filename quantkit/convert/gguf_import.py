"""GGUF -> plain HF folder: every tensor type the `gguf` package dequantizes (K-quants and I-quants included).

transformers' GGUF loader maps llama.cpp names back, undoes the Q/K permutation and rebuilds
the tokenizer; it dequantizes each tensor with `gguf.quants.dequantize`. A file whose type
or architecture it cannot read is refused with one line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from quantkit.formats.checkpoint import save_tokenizer_and_generation

log = logging.getLogger(__name__)


def gguf_types(path: Path) -> dict[str, int]:
    """{GGML type name: tensor count} of a GGUF file; refuses a file the gguf reader cannot parse."""
    from quantkit.integrity import open_gguf

    reader = open_gguf(Path(path))
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def gguf_to_hf(path: Path, out: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Dequantize `path` into the (temporary) folder `out` as safetensors in `dtype`."""
    from quantkit.models.sources import _load_gguf

    types = gguf_types(path)
    model, tok = _load_gguf(path, dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer_and_generation(model, tok, out)
    return {"gguf_tensor_types": types}
