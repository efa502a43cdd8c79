"""What a GGUF file holds, from its header only: architecture, tensor types and their share, bits per
weight, tokenizer, and the provenance quantkit writes when it exports one (`quantkit info model.gguf`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from quantkit.integrity import open_gguf

log = logging.getLogger(__name__)


def _value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        log.debug("GGUF key %s unreadable: %s", key, e)
        return None


def _file_type(code: int | None) -> str | None:
    import gguf

    if code is None:
        return None
    try:
        return gguf.LlamaFileType(int(code)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {code}"


def gguf_info(path: Path) -> dict[str, Any]:
    """A JSON-ready summary of the GGUF file `path` (tensor data is not read)."""
    reader = open_gguf(path)
    arch = _value(reader, "general.architecture")
    types: dict[str, dict[str, int]] = {}
    for t in reader.tensors:
        entry = types.setdefault(t.tensor_type.name, {"tensors": 0, "bytes": 0, "weights": 0})
        entry["tensors"] += 1
        entry["bytes"] += int(t.n_bytes)
        entry["weights"] += int(t.n_elements)
    n_tensors = sum(e["tensors"] for e in types.values())
    n_bytes = sum(e["bytes"] for e in types.values())
    n_weights = sum(e["weights"] for e in types.values())
    for e in types.values():
        e["share_tensors_pct"] = round(100 * e["tensors"] / n_tensors, 2) if n_tensors else 0.0
        e["share_bytes_pct"] = round(100 * e["bytes"] / n_bytes, 2) if n_bytes else 0.0
        e["bits_per_weight"] = round(8 * e["bytes"] / e["weights"], 3) if e["weights"] else 0.0
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    tokenizer = {"model": _value(reader, "tokenizer.ggml.model"), "pre": _value(reader, "tokenizer.ggml.pre"),
                 "vocab_size": len(tokens.data) if tokens is not None else None,
                 "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
                 "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id")}
    prov_text = _value(reader, "quantkit.provenance")
    try:
        provenance = json.loads(prov_text) if isinstance(prov_text, str) else None
    except json.JSONDecodeError:
        provenance = {"raw": prov_text}
    return {
        "path": str(path), "format": "gguf", "gguf_version": _value(reader, "GGUF.version"),
        "size_bytes": path.stat().st_size, "architecture": arch, "name": _value(reader, "general.name"),
        "file_type": _file_type(_value(reader, "general.file_type")),
        "context_length": _value(reader, f"{arch}.context_length") if arch else None,
        "block_count": _value(reader, f"{arch}.block_count") if arch else None,
        "tensor_count": n_tensors, "parameters": n_weights, "tensor_bytes": n_bytes,
        "bits_per_weight": round(8 * n_bytes / n_weights, 3) if n_weights else None,
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "tokenizer": tokenizer, "metadata_keys": len(reader.fields), "quantkit": provenance,
    }
