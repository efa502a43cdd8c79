"""What a model path is, from its files alone (no weights loaded): method, format, size, bits per weight."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.models.sources import resolve

log = logging.getLogger(__name__)


def label(path: str) -> str:
    """A short name for tables and plots: the folder or file name (aliases stay as typed)."""
    p = Path(path)
    return p.name if (p.exists() or "/" in path or "\\" in path) and p.name else path


def _gguf_info(path: Path) -> dict[str, Any]:
    """GGUF file type (e.g. Q4_1) and stored bits per weight over all tensors."""
    import gguf

    from quantkit.integrity import open_gguf

    reader = open_gguf(Path(path))
    out: dict[str, Any] = {}
    field = reader.fields.get("general.file_type")
    if field is not None:
        code = int(field.parts[field.data[0]][0])
        try:
            out["method"] = "gguf " + gguf.LlamaFileType(code).name.removeprefix("MOSTLY_")
        except ValueError:
            out["method"] = f"gguf type {code}"
    n = sum(int(t.n_elements) for t in reader.tensors)
    if n:
        out["bits_per_weight"] = out["bits_per_weight_all"] = sum(int(t.n_bytes) for t in reader.tensors) * 8 / n
    return out


def _float_bits(folder: Path) -> float | None:
    from quantkit.formats.stats import tensor_entries

    entries = tensor_entries(folder).values()
    n = sum(e.numel for e in entries)
    return sum(e.nbytes for e in entries) * 8 / n if n else None


def _activation_tag(qc: dict[str, Any]) -> str:
    """", A8 int8 per token" (or fp8, static per tensor) for a compressed-tensors config that quantizes activations:
    what the row's quality figures include."""
    for group in (qc.get("config_groups") or {}).values():
        act = group.get("input_activations") if isinstance(group, dict) else None
        if act:
            number = "fp8" if act.get("type") == "float" else "int8"
            how = "per token" if act.get("dynamic") else f"static per {act.get('strategy')}"
            return f", A8 {number} {how}"
    return ""


def _activation_short(qc: dict[str, Any]) -> str:
    """"W8A8 int8 dyn", "FP8 static", ... for a compressed-tensors config that quantizes activations, else ""."""
    for group in (qc.get("config_groups") or {}).values():
        act = group.get("input_activations") if isinstance(group, dict) else None
        if act:
            kind = "FP8" if act.get("type") == "float" else "W8A8 int8"
            return f"{kind} {'dyn' if act.get('dynamic') else 'static'}"
    return ""


def kv_cache_bytes(cfg: dict[str, Any], qc: dict[str, Any] | None) -> int | None:
    """KV-cache bytes per token as an engine stores the cache: 1 byte a value for a quantized (FP8) cache, else 2
    (fp16/bf16); layers x KV heads x head dim x 2 x bytes."""
    from quantkit.models.kvcache import bytes_per_token

    return bytes_per_token(cfg, 1 if qc and qc.get("kv_cache_scheme") else 2)


def tensor_bytes(folder: Path) -> int | None:
    """Bytes of every stored tensor (the weights an engine holds in memory), from the safetensors headers."""
    from quantkit.formats.stats import tensor_entries

    try:
        return sum(e.nbytes for e in tensor_entries(folder).values())
    except (QuantkitError, OSError, ValueError, KeyError) as e:
        log.debug("no tensor sizes for %s: %s", folder, e)
        return None


def describe(path: str) -> dict[str, Any]:
    """Method, format and size of a model path, from its files (no weights loaded); KV-cache bytes per token and
    (`_tensor_bytes`, for the memory at a context) the stored tensors' bytes."""
    from quantkit.paths import folder_size

    src = resolve(path)
    p = Path(src.path)
    row: dict[str, Any] = {"model": path, "label": label(path), "method": "float", "format": src.kind,
                           "size_bytes": folder_size(p) if src.kind != "hub" else None}
    if src.kind == "gguf":
        try:
            row.update(_gguf_info(p))
        except (ImportError, OSError, ValueError, KeyError, IndexError) as e:
            log.debug("no GGUF info for %s: %s", path, e)
        return row
    if src.kind != "folder":
        return row
    cfg = json.loads((p / "config.json").read_text())
    qc = cfg.get("quantization_config")
    row["kv_bytes_per_token"] = kv_cache_bytes(cfg, qc)
    row["_tensor_bytes"] = tensor_bytes(p)
    if qc:
        row["format"] = qc.get("quant_method")
        row["method"] = qc.get("quant_method")
        if qc.get("quant_method") == "compressed-tensors":
            row["format"] = f"compressed-tensors {qc.get('format')}{_activation_tag(qc)}"
            if qc.get("kv_cache_scheme"):
                row["format"] += ", KV fp8 per tensor"
    prov = p / "quantkit.json"
    if prov.is_file():
        meta = json.loads(prov.read_text())
        row["method"] = meta.get("method", row["method"])
        row["scheme"] = meta.get("scheme")
    short = _activation_short(qc) if qc and qc.get("quant_method") == "compressed-tensors" else ""
    if short:
        row["method"] = f"{row['method']} {short}"  # the method column says that activations are quantized
    if qc and qc.get("kv_cache_scheme"):
        row["method"] = f"{row['method']} KV-fp8"  # and that its cache is quantized (scored so)
    if qc and qc.get("quant_method") == "bitsandbytes" and row["method"] == "int8":
        row["method"] = "int8 (bnb LLM.int8)"  # not quantkit's own 8-bit weights (rtn/gptq w8, cpu-int8 kernel)
    try:
        from quantkit.formats.stats import checkpoint_stats

        if qc:
            stats = checkpoint_stats(p)
            row["bits_per_weight"], row["bits_per_weight_all"] = stats["bits_per_weight"], stats["bits_per_weight_all"]
        else:
            row["bits_per_weight"] = row["bits_per_weight_all"] = _float_bits(p)
    except (ImportError, QuantkitError, KeyError, ValueError) as e:
        log.debug("no stats for %s: %s", path, e)
    return row
