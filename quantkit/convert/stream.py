"""Tensor-by-tensor safetensors writing for conversions: a file whose header is known up front.

`StreamingWriter` writes the header from a plan of (name, dtype, shape) and then each tensor's bytes in
plan order: peak memory is one tensor. Reading (`scan`, `read_tensor`) and the dtype table are
`quantkit.formats.safetensors_io`'s, re-exported here for the conversion modules.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

# reading (headers, one tensor) and the dtype table live in the one safetensors module
from quantkit.formats.safetensors_io import TensorInfo, code, read_tensor, scan  # noqa: F401 - re-exported
from quantkit.formats.safetensors_io import nbytes as tensor_nbytes  # bytes of (dtype, shape) without allocating


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order of `plan`."""

    def __init__(self, path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path, self.plan = path, plan
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        off = 0
        for p in plan:
            header[p.name] = {"dtype": code(p.dtype), "shape": list(p.shape), "data_offsets": [off, off + p.nbytes]}
            off += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._fh: BinaryIO = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, t: Tensor) -> None:
        p = self.plan[self._next]
        if name != p.name or t.dtype != p.dtype or tuple(t.shape) != p.shape:
            raise RuntimeError(f"tensor {name} {t.dtype} {tuple(t.shape)} does not match the plan {p}")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self.plan):
            raise RuntimeError(f"{self.path}: wrote {self._next} of {len(self.plan)} planned tensors")

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()
