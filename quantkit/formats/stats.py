"""What a checkpoint folder stores: parameters, bytes, and bits per quantized weight.

Quantized Linears are recognised by the tensors each format writes, so one
function covers every format quantkit writes or reads:

  packed integer (GPTQ, AWQ, ...): X.qweight (+ X.qzeros, X.scales, X.g_idx)
                    weights = qweight bits / `bits`
  bitsandbytes 4-bit: X.weight + X.weight.absmax/.quant_map/.nested_*/.quant_state.*
                    weights = prod(shape) from the quant_state blob
  bitsandbytes int8: X.weight (int8) + X.SCB + X.weight_format
                    weights = numel(X.weight)
  compressed-tensors: X.weight_scale + X.weight (int8 / fp8, int-/float-quantized) or X.weight_packed
                    (pack-quantized), + X.weight_zero_point, X.weight_g_idx, X.weight_shape, X.input_scale
                    weights = numel(X.weight), or weight_packed bits / num_bits

bits_per_weight = every stored bit of those tensors (codes, scales, zeros, g_idx,
absmax, double-quant tables, state blobs) / number of quantized weights. Biases are
counted as ordinary parameters, not as overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import CheckpointError
from quantkit.formats.bnb import QUANT_STATE, quant_state_info
from quantkit.formats.compressed_tensors import embedding_grid, is_embedding_group, is_embedding_name
from quantkit.formats.dynamic import read_dynamic
from quantkit.formats.loader import weight_files
from quantkit.formats.safetensors_io import CODE_BYTES as DTYPE_BYTES  # safetensors dtype code -> bytes per element
from quantkit.formats.safetensors_io import header, read_one
from quantkit.models.sources import read_config
from quantkit.scheme import ModuleGrid
PACKED_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")
CT_PARTS = (".weight", ".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_g_idx", ".weight_shape",
            ".input_scale")


def _ct_bits(qc: dict[str, Any]) -> int:
    """num_bits of the Linears' config group."""
    for group in (qc.get("config_groups") or {}).values():
        if isinstance(group, dict) and group.get("weights") and not is_embedding_group(group):
            return int(group["weights"].get("num_bits", 8))
    return 8


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.dtype not in DTYPE_BYTES:
            raise CheckpointError(f"unknown safetensors dtype {self.dtype} in {self.file}")
        return self.numel * DTYPE_BYTES[self.dtype]


def tensor_entries(folder: Path) -> dict[str, TensorEntry]:
    """name -> (dtype, shape, file) of every stored tensor, read from the headers only."""
    out: dict[str, TensorEntry] = {}
    for f in weight_files(folder):
        for k, v in header(f).items():
            out[k] = TensorEntry(v["dtype"], tuple(v["shape"]), f)
    return out


def _read(entry: TensorEntry, name: str):
    return read_one(entry.file, name)


def quantized_groups(entries: dict[str, TensorEntry], qc: dict[str, Any]) -> dict[str, tuple[int, list[str]]]:
    """module name -> (number of quantized weights, names of the tensors that store them)."""
    groups: dict[str, tuple[int, list[str]]] = {}
    base_bits = qc.get("bits", qc.get("w_bit"))
    grids = (read_dynamic(qc, ModuleGrid(bits=base_bits, group_size=qc.get("group_size", -1)))
             if qc.get("dynamic") and isinstance(base_bits, int) and base_bits > 0 else None)  # GPTQ per-module grids
    for name, e in entries.items():
        if name.endswith(".qweight"):
            mod = name.removesuffix(".qweight")
            grid = grids.grid(mod) if grids is not None else None
            bits = grid.bits if grid is not None else base_bits
            if not isinstance(bits, int) or bits <= 0:
                raise CheckpointError(f"{mod}.qweight is packed but quantization_config gives no integer 'bits'")
            parts = [mod + s for s in PACKED_PARTS if mod + s in entries]
            groups[mod] = (e.nbytes * 8 // bits, parts)
        elif QUANT_STATE in name:
            mod = name.split(QUANT_STATE)[0]
            info = quant_state_info(_read(e, name))
            shape = info.get("shape")
            n = math.prod(shape) if shape else entries[mod + ".weight"].nbytes * 2  # 2 codes per byte
            parts = [k for k in entries if k == mod + ".weight" or k.startswith(mod + ".weight.")]
            groups[mod] = (n, parts)
        elif name.endswith(".weight_scale") and qc.get("quant_method") == "compressed-tensors":
            mod = name.removesuffix(".weight_scale")
            parts = [mod + s for s in CT_PARTS if mod + s in entries]
            if mod + ".weight_packed" in entries:
                emb = embedding_grid(qc) if is_embedding_name(mod) else None  # its own group's bits
                bits = emb[0] if emb is not None else _ct_bits(qc)
                groups[mod] = (entries[mod + ".weight_packed"].nbytes * 8 // bits, parts)
            elif mod + ".weight" in entries:
                groups[mod] = (entries[mod + ".weight"].numel, parts)
        elif name.endswith(".SCB"):
            mod = name.removesuffix(".SCB")
            weight = entries.get(mod + ".weight")
            if weight is not None and weight.dtype == "I8":
                parts = [k for k in (mod + ".weight", name, mod + ".weight_format") if k in entries]
                groups[mod] = (weight.numel, parts)
    return groups


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def checkpoint_stats(folder: str | Path) -> dict[str, Any]:
    """Sizes of a checkpoint folder (quantized or not).

    quant_method:       quantization_config.quant_method, or None for a float model
    bits_per_weight:    stored bits of the quantized Linears / their weight count (None if none)
    embedding_bits_per_weight: the same for a quantized token embedding (compressed-tensors), else None
    bits_per_weight_all: stored bits of every tensor / every parameter (embeddings, norms and an fp16 lm_head
                        included: what the file costs per weight of the model)
    quantized_params:   weights stored quantized (a quantized embedding's included)
    total_params:       every parameter stored (quantized weights counted once, side tensors not)
    size_bytes:         all files of the folder
    tensor_count:       tensors in the safetensors files
    quantized_modules:  Linears stored quantized
    """
    folder = Path(folder)
    qc = read_config(folder).get("quantization_config") or {}
    entries = tensor_entries(folder)
    groups = quantized_groups(entries, qc)
    claimed = {t for _, parts in groups.values() for t in parts}
    emb = {m for m in groups if qc.get("quant_method") == "compressed-tensors" and is_embedding_name(m)}
    linear = {m: g for m, g in groups.items() if m not in emb}
    n_quant = sum(n for n, _ in linear.values())
    quant_bits = sum(entries[t].nbytes * 8 for _, parts in linear.values() for t in parts)
    n_emb = sum(groups[m][0] for m in emb)
    emb_bits = sum(entries[t].nbytes * 8 for m in emb for t in groups[m][1])
    plain = sum(e.numel for k, e in entries.items() if k not in claimed)
    all_bits = sum(e.nbytes * 8 for e in entries.values())
    return {
        "quant_method": qc.get("quant_method"),
        "bits_per_weight": quant_bits / n_quant if n_quant else None,
        "bits_per_weight_all": all_bits / (plain + n_quant + n_emb) if plain + n_quant + n_emb else None,
        "embedding_bits_per_weight": emb_bits / n_emb if n_emb else None,
        "quantized_params": n_quant + n_emb,
        "total_params": plain + n_quant + n_emb,
        "size_bytes": folder_bytes(folder),
        "tensor_count": len(entries),
        "quantized_modules": len(linear),
    }
