"""Sharded, streaming safetensors output: one tensor in memory at a time, whatever the model size.

The writer receives entries (name, dtype, shape, a function producing the tensor) and knows
nothing about what the names mean (packed GPTQ tensors, renamed MoE experts, plain floats).

- Shards are filled greedily in the entries' order, as transformers' `save_pretrained` does:
  a new shard starts when the next tensor would push the current one past `max_shard_size`
  (a tensor larger than that gets a shard of its own).
- One shard is written as `model.safetensors`; several as `model-0000k-of-0000n.safetensors`
  plus `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}).
- Inside a file, tensors follow safetensors' own serialization order (dtype alignment first,
  then name) with its exact header bytes, so a single-shard output is byte-identical to
  `safetensors.torch.save_file` of the same tensors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 2 * 10**9  # "2GB", transformers' unit convention (decimal)

# safetensors' dtype codes; the rank is the position in its Rust `Dtype` enum, which orders a file's
# tensors (largest rank first, then by name).
DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 4), torch.int8: ("I8", 5), torch.float8_e4m3fn: ("F8_E4M3", 7),
    torch.int16: ("I16", 9),
    torch.float16: ("F16", 11), torch.bfloat16: ("BF16", 12), torch.int32: ("I32", 13), torch.float32: ("F32", 15),
    torch.float64: ("F64", 16), torch.int64: ("I64", 17),
}


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Entry:
    """One tensor of the output: what it will be, and how to produce it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def file_order(entries: Iterable[Entry]) -> list[Entry]:
    """safetensors' serialization order: dtype rank descending, then name (bytewise)."""
    return sorted(entries, key=lambda e: (-DTYPES[e.dtype][1], e.name.encode()))


def assign_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Greedy split in the given order (the model's order: blocks stay together)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [WEIGHTS] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None, align: int = 8) -> bytes:
    """The 8-byte length and JSON header safetensors writes for `entries` (already in file order).

    The data starts `align`-byte aligned in the file (safetensors: 8; trailing spaces pad the JSON)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPES[e.dtype][0], "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(len(raw) + 8) % align)  # data starts aligned (8 | align: the same bytes as safetensors at 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None,
               check: Callable[[str, Tensor], None] | None = None, align: int = 8, in_order: bool = False) -> None:
    """One safetensors file, tensor by tensor; `check(name, t)` may refuse a tensor before it is written.

    `in_order` keeps the entries' order instead of safetensors' own; with `align` (a multiple of 8)
    the data starts at that alignment, so tensors whose offsets are multiples of it map aligned."""
    ordered = list(entries) if in_order else file_order(entries)
    with open(path, "wb") as fh:
        fh.write(header_bytes(ordered, metadata, align))
        for e in ordered:
            t = e.load()
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise RuntimeError(f"tensor {e.name}: produced {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
            if check is not None:
                check(e.name, t)
            fh.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t


def write_shards(folder: Path, entries: list[Entry], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None,
                 check: Callable[[str, Tensor], None] | None = None) -> list[str]:
    """Write `entries` (in model order) into `folder` as one or more shards; returns the file names."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RuntimeError(f"tensor {dup} is planned twice")
    shards = assign_shards(entries, max_shard_size)
    files = shard_names(len(shards))
    for fname, shard in zip(files, shards, strict=True):
        write_file(folder / fname, shard, metadata or {"format": "pt"}, check)
    if len(files) > 1:
        weight_map = {e.name: f for f, shard in zip(files, shards, strict=True) for e in shard}
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def natural_key(name: str) -> tuple:
    """'model.layers.10.x' after 'model.layers.9.x': numbers compare as numbers (model order)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))



_CODES = {code: dt for dt, (code, _) in DTYPES.items()}


def raw_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype code, shape) of a file, from its header only (no tensor data is read)."""
    from quantkit.integrity import safetensors_header

    header = dict(safetensors_header(path)[1])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (torch dtype, shape) of a file written by this module (dtypes it knows)."""
    return {k: (_CODES[code], shape) for k, (code, shape) in raw_header(path).items()}
