"""Tensor-by-tensor safetensors I/O: read one tensor at a time, write a file whose header is known up front.

`read_tensor` reads one tensor's bytes at the offset the header gives (plain seek + read, no
mapping of the file stays resident). `StreamingWriter` writes the header from a plan of
(name, dtype, shape) and then each tensor's bytes in plan order: peak memory is one tensor.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from quantkit.errors import CheckpointError
from quantkit.formats.shards import nbytes as tensor_nbytes  # bytes of (dtype, shape) without allocating

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}




@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in `file`

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def scan(files: list[Path]) -> dict[str, TensorInfo]:
    """name -> (file, dtype, shape) of every tensor, reading headers only. Truncated files are refused."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            start = 8 + n  # the data follows the 8-byte length and the header
            if start + end > size:
                raise CheckpointError(f"{f} is truncated ({size} bytes, its header needs {start + end}); re-download it")
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if v["dtype"] not in _CODE_DTYPES:
                    raise CheckpointError(f"{f}: tensor {k} has unsupported dtype {v['dtype']}")
                info = TensorInfo(f, _CODE_DTYPES[v["dtype"]], tuple(v["shape"]), start + v["data_offsets"][0])
                if v["data_offsets"][1] - v["data_offsets"][0] != info.nbytes:
                    raise CheckpointError(f"{f}: tensor {k} holds {v['data_offsets'][1] - v['data_offsets'][0]} bytes, "
                                          f"its dtype and shape need {info.nbytes}; the file is corrupt")
                infos[k] = info
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise CheckpointError(f"cannot read {f}: {_first_line(e)}; is it a safetensors file?") from None
    return infos


def read_tensor(info: TensorInfo, name: str) -> Tensor:
    """One tensor, read with a plain seek + read at the offset `scan` found (safetensors data is
    little-endian and unaligned-safe to copy). No mapping of the file: memory is this tensor only,
    and a read costs no header parse (opening the file with safe_open per tensor did)."""
    assert sys.byteorder == "little", "safetensors data is little-endian"
    buf = bytearray(info.nbytes)
    try:
        with open(info.file, "rb") as fh:
            fh.seek(info.offset)
            got = fh.readinto(buf)
    except OSError as e:
        raise CheckpointError(f"cannot read {name} from {info.file}: {_first_line(e)}") from None
    if got != info.nbytes:
        raise CheckpointError(f"cannot read {name} from {info.file}: the file ends {info.nbytes - got} bytes early")
    if not info.nbytes:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype).reshape(info.shape)


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
            header[p.name] = {"dtype": DTYPE_CODES[p.dtype], "shape": list(p.shape), "data_offsets": [off, off + p.nbytes]}
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
