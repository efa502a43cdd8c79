"""The front door: `quantkit.load` (any model quantkit reads, ready for inference) and `resolve_device`.

Packed checkpoints are rebuilt by `quantkit.formats.loader` with the reference QuantLinear, then the
kernels (`quantkit.kernels`) serve the quantized Linears; bitsandbytes checkpoints load through
transformers; anything else (plain HF folders, .gguf files, aliases) loads as a float model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantkit.errors import ModelSourceError, QuantkitError
from quantkit.formats.loader import load_packed, weight_files
from quantkit.formats.specs import detect_format
from quantkit.models.sources import load_model, read_config, resolve

if TYPE_CHECKING:
    from quantkit.kernels.cache import PackCache

__all__ = ["load", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """auto -> cuda when available, else cpu; cuda[:N] must exist. The one place a --device is read."""
    text = str(requested)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise QuantkitError(f"unknown --device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise QuantkitError(f"--device {text} is not supported by quantkit; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantkitError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QuantkitError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s); pick a smaller index")
    return dev


def _pack_cache(folder: Path, qc: dict[str, Any], kernel: str, device: torch.device, dtype: torch.dtype,
                requested: bool | None) -> PackCache | None:
    """The packed-weight cache entry of this load, or None (cache off, or a kernel that packs nothing)."""
    from quantkit.kernels import AUTO, KERNELS, REFERENCE
    from quantkit.kernels.cache import PackCache, cache_enabled

    if kernel == REFERENCE or not cache_enabled(requested):
        return None
    if detect_format(qc).read(qc)[1].input_activations is not None:
        return None  # W8A8 / FP8 layers: their kernels quantize activations and keep no packed-weight cache
    if kernel != AUTO and not KERNELS[kernel].cacheable:
        return None
    return PackCache.of(folder, weight_files(folder), qc, kernel, dtype, device)


def load(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         trust_remote_code: bool = False, kernel: str = "reference", pack_cache: bool | None = None) -> nn.Module:
    """Load a quantkit checkpoint, a plain HF folder, a .gguf file or an alias, for inference.

    `kernel` serves the quantized Linears: "reference" (exact pure-PyTorch maths in `dtype`), "auto"
    (fastest accepting kernel per layer; may compute in bf16) or a name from quantkit.kernels.kernel_names().
    `pack_cache`: keep the kernels' packed weights for the next load (quantkit.kernels.cache; default on
    unless $QUANTKIT_PACK_CACHE=0).
    """
    from quantkit.kernels import apply_kernels, check_kernel_name

    check_kernel_name(kernel)
    src = resolve(path)
    if src.kind == "folder":
        folder = Path(src.path)
        qc = read_config(folder).get("quantization_config")
        if qc is not None:
            if detect_format(qc) is not None:
                cache = _pack_cache(folder, qc, kernel, torch.device(device), dtype, pack_cache)
                layout, _ = detect_format(qc).read(qc)
                ready = (cache.read(layout, dtype) or {}) if cache else {}
                model = load_packed(folder, qc, device, dtype, trust_remote_code, ready)
                apply_kernels(model, kernel, dtype)  # after a hit: only the layers no kernel served (if any)
                if cache and not ready:
                    cache.write(model, background=True)  # the load returns once packed
                return model
            if qc.get("quant_method") == "bitsandbytes":
                from quantkit.formats.bnb import load_bnb  # bitsandbytes is an optional extra

                return load_bnb(Path(src.path), device, dtype, trust_remote_code)
            raise ModelSourceError(f"{path}: quantization method {qc.get('quant_method')!r} is not supported by quantkit.load")
    model, _ = load_model(src, dtype, trust_remote_code)
    return model.to(device)
