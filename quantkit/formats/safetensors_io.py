"""The one safetensors module: the dtype table, checked reading and atomic, durable, hashed writing.

Every quantkit reader of a .safetensors file comes through here, so a damaged file (cut short, a header
that is not JSON, offsets past its end) is refused once, with one line that names the file
(`quantkit.integrity.safetensors_header`), and every writer fsyncs once (`quantkit.paths.durable_replace`).

Reading:
  header(path)          tensor name -> {"dtype", "shape", "data_offsets"}, metadata apart; checked
  metadata(path)        the file's "__metadata__" strings
  scan(files)           name -> TensorInfo (file, torch dtype, shape, absolute offset), headers only
  read_tensor(info)     one tensor by seek + read (no mapping stays resident)
  load(path, keep)      the file's tensors (or those `keep` accepts), through one checked mapping
Writing:
  header_bytes(...)     the exact 8-byte length + JSON header safetensors itself writes
  write_entries(...)    a file tensor by tensor (peak: one tensor); returns its size and xxh3-128 checksum
  save(tensors, path)   the same through a temporary name, fsync, rename, fsync of the folder
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch
from torch import Tensor

from quantkit.errors import CheckpointError
from quantkit.integrity import safetensors_header
from quantkit.paths import durable_replace

# torch dtype -> (safetensors code, rank). The rank is the position in safetensors' Rust `Dtype` enum,
# which orders a file's tensors (largest rank first, then by name).
DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 4), torch.int8: ("I8", 5), torch.float8_e4m3fn: ("F8_E4M3", 7),
    torch.int16: ("I16", 9),
    torch.float16: ("F16", 11), torch.bfloat16: ("BF16", 12), torch.int32: ("I32", 13), torch.float32: ("F32", 15),
    torch.float64: ("F64", 16), torch.int64: ("I64", 17),
}
CODES: dict[str, torch.dtype] = {code: dt for dt, (code, _) in DTYPES.items()}
# bytes per element of every code a file may hold (some have no torch dtype quantkit computes with)
CODE_BYTES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                              "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def code(dtype: torch.dtype) -> str:
    return DTYPES[dtype][0]


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.empty((), dtype=dtype).element_size() * math.prod(shape)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------------------------------------- reading
def header(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {"dtype", "shape", "data_offsets"} of every tensor, after the damaged-file check."""
    h = dict(safetensors_header(Path(path))[1])
    h.pop("__metadata__", None)
    return h


def metadata(path: Path) -> dict[str, str]:
    return dict(safetensors_header(Path(path))[1].get("__metadata__") or {})


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in `file`

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def scan(files: Iterable[Path]) -> dict[str, TensorInfo]:
    """name -> TensorInfo of every tensor of `files`, from their headers only. Damaged files are refused."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        f = Path(f)
        n, h = safetensors_header(f)
        for k, v in h.items():
            if k == "__metadata__":
                continue
            if v.get("dtype") not in CODES:
                raise CheckpointError(f"{f}: tensor {k} has unsupported dtype {v.get('dtype')}")
            info = TensorInfo(f, CODES[v["dtype"]], tuple(v["shape"]), 8 + n + v["data_offsets"][0])
            if v["data_offsets"][1] - v["data_offsets"][0] != info.nbytes:
                raise CheckpointError(f"{f}: tensor {k} holds {v['data_offsets'][1] - v['data_offsets'][0]} bytes, "
                                      f"its dtype and shape need {info.nbytes}; the file is damaged")
            infos[k] = info
    return infos


def read_tensor(info: TensorInfo, name: str) -> Tensor:
    """One tensor, read with a plain seek + read at the offset `scan` found: memory is this tensor only,
    no mapping of the file stays, and a read costs no header parse."""
    assert sys.byteorder == "little", "safetensors data is little-endian"
    buf = bytearray(info.nbytes)
    try:
        with open(info.file, "rb") as fh:
            fh.seek(info.offset)
            got = fh.readinto(buf)
    except OSError as e:
        raise CheckpointError(f"cannot read {name} from {info.file}: {e.strerror or _first_line(e)}") from None
    if got != info.nbytes:
        raise CheckpointError(f"{info.file} is truncated: tensor {name} ends {info.nbytes - got} bytes past its end")
    if not info.nbytes:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype).reshape(info.shape)


@contextmanager
def open_file(path: Path) -> Iterator[Any]:
    """`safetensors.safe_open` of a file that passed the damaged-file check; the library's own errors on
    it become one `CheckpointError` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends, on a file damaged past its header
        if type(e).__name__ not in ("SafetensorError", "OSError", "ValueError", "RuntimeError"):
            raise
        raise CheckpointError(f"{path} is damaged: {_first_line(e)}; re-download or re-export it") from None


def load(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """Every tensor of a file (or those whose name `keep` accepts), in name order."""
    with open_file(path) as fh:
        return {k: fh.get_tensor(k) for k in sorted(fh.keys()) if keep is None or keep(k)}


def read_one(path: Path, name: str) -> Tensor:
    """One tensor of a file (the file is mapped for this read only)."""
    with open_file(path) as fh:
        return fh.get_tensor(name)


# ---------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Entry:
    """One tensor of an output: what it will be, and how to produce it when its turn comes."""

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


def header_bytes(entries: list[Entry], meta: dict[str, str] | None, align: int = 8) -> bytes:
    """The 8-byte length and JSON header safetensors writes for `entries` (already in file order).

    The data starts `align`-byte aligned in the file (safetensors: 8; trailing spaces pad the JSON)."""
    h: dict[str, object] = {}
    if meta:
        h["__metadata__"] = meta
    off = 0
    for e in entries:
        h[e.name] = {"dtype": code(e.dtype), "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(len(raw) + 8) % align)  # data starts aligned (8 | align: the same bytes as safetensors at 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class Written:
    """What a writer wrote: the file's size and its xxh3-128 checksum (hex)."""

    size: int
    xxh3: str

    def record(self) -> dict[str, Any]:
        return {"size": self.size, "xxh3_128": self.xxh3}


class _HashingFile:
    """A binary file whose every written byte also goes through the checksum."""

    def __init__(self, fh: BinaryIO):
        import xxhash

        self.fh, self.h, self.size = fh, xxhash.xxh3_128(), 0

    def write(self, data: Any) -> None:
        self.h.update(data)
        self.fh.write(data)
        self.size += memoryview(data).nbytes


def checksum(path: Path, chunk: int = 1 << 23) -> Written:
    """Size and xxh3-128 of a file, read back (what a resume compares with the record)."""
    import xxhash

    h, size = xxhash.xxh3_128(), 0
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            h.update(data)
            size += len(data)
    return Written(size, h.hexdigest())


def write_entries(path: Path, entries: Iterable[Entry], meta: dict[str, str] | None = None,
                  check: Callable[[str, Tensor], None] | None = None, align: int = 8, in_order: bool = False,
                  fsync: bool = False) -> Written:
    """One safetensors file, tensor by tensor; `check(name, t)` may refuse a tensor before it is written.

    `in_order` keeps the entries' order instead of safetensors' own; with `align` (a multiple of 8) the data
    starts at that alignment. In safetensors' order at 8 the bytes are `safetensors.torch.save_file`'s."""
    ordered = list(entries) if in_order else file_order(entries)
    with open(path, "wb") as raw:
        fh = _HashingFile(raw)
        fh.write(header_bytes(ordered, meta, align))
        for e in ordered:
            t = e.load()
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise RuntimeError(f"tensor {e.name}: produced {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
            if check is not None:
                check(e.name, t)
            fh.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t
        if fsync:
            raw.flush()
            os.fsync(raw.fileno())
    return Written(fh.size, fh.h.hexdigest())


def entries_of(tensors: dict[str, Tensor]) -> list[Entry]:
    return [Entry(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]


def save(tensors: dict[str, Tensor], path: Path, meta: dict[str, str] | None = None,
         before_rename: Callable[[Path], None] | None = None) -> Written:
    """`tensors` as `path` (the bytes of `safetensors.torch.save_file`), atomically and durably: a temporary
    name beside it, fsync, rename, fsync of the folder. `before_rename(tmp)`: a test's fault point."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        written = write_entries(tmp, entries_of(tensors), meta or {"format": "pt"}, fsync=True)
        if before_rename is not None:
            before_rename(tmp)
        durable_replace(tmp, path, synced=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written
