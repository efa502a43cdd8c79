"""Damaged and unsafe weight files, refused with one line that names the file and what is wrong.

`check_folder` and `check_gguf` run when a model path is resolved, before any library parses the file:
a truncated or overwritten safetensors header, a GGUF file cut short, or a folder that only holds
pickle weights (`pytorch_model.bin`, `.pt`, `.pth`, `.ckpt`) become a `CheckpointError` (exit code 2)
instead of a JSON, struct or numpy error from deep inside a reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from quantkit.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the header size
_REDO = "re-download or re-export it"


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a safetensors file, after checking that the file holds every byte its
    header describes. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is damaged: {size} bytes, too short for a safetensors file; {_REDO}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path} is damaged or not a safetensors file: its header claims {n:,} bytes, "
                                      f"the file has {size:,}; {_REDO}")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} is damaged: its safetensors header is not valid ({_first_line(e)}); {_REDO}") from None
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise CheckpointError(f"{path} is truncated: {size:,} bytes, its header describes {need:,}; {_REDO}")
    return n, header


def pickle_refusal(folder: Path, found: Path) -> CheckpointError:
    """The error for a folder whose weights are only in a pickle file: which file, and how to convert it."""
    return CheckpointError(
        f"{folder} has no .safetensors weights, only {found}, a pickle file quantkit does not load (unpickling "
        f"can run code); convert it "
        f"once, in an environment you trust: AutoModelForCausalLM.from_pretrained(\"{folder}\").save_pretrained("
        f"\"{folder}-safetensors\", safe_serialization=True)")


def check_folder(folder: Path) -> None:
    """Refuse a model folder whose safetensors files are damaged, or whose only weights are pickles."""
    tensors = sorted(folder.glob("*.safetensors"))
    for f in tensors:
        safetensors_header(f)
    if not tensors:
        pickles = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES
                         and not f.name.startswith(("training_args", "optimizer", "scheduler", "rng_state")))
        if pickles:
            raise pickle_refusal(folder, pickles[0])


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` of `path`, or a `CheckpointError` naming the file when it is cut short or damaged."""
    from gguf import GGUFReader

    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic); {_REDO}")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises struct, numpy and value errors on cut files
        raise CheckpointError(f"{path} is damaged or truncated ({size:,} bytes; the GGUF reader stopped with: "
                              f"{_first_line(e)}); {_REDO}") from None
    need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if need > size:
        raise CheckpointError(f"{path} is truncated: {size:,} bytes, its tensors need {need:,}; {_REDO}")
    return reader


def check_gguf(path: Path) -> None:
    open_gguf(path)
