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
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

# the dtype table, Entry and the file writer live in the one safetensors module
from quantkit.formats.safetensors_io import (CODES, DTYPES, Entry, file_order, header,  # noqa: F401 - re-exported
                                             header_bytes, nbytes, write_entries)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 2 * 10**9  # "2GB", transformers' unit convention (decimal)

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


def write_file(path: Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None,
               check: Callable[[str, Tensor], None] | None = None, align: int = 8, in_order: bool = False) -> None:
    """One safetensors file, tensor by tensor (`safetensors_io.write_entries`)."""
    write_entries(path, entries, metadata, check, align, in_order)


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



def raw_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype code, shape) of a file, from its header only (no tensor data is read)."""
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header(path).items()}


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (torch dtype, shape) of a file written by this module (dtypes it knows)."""
    return {k: (CODES[c], shape) for k, (c, shape) in raw_header(path).items()}
