"""The base model's results, computed once and cached by content.

Key: sha256 of (cache layout version, the base's file contents, the exact token
windows and scored positions, dtype, device type, torch and transformers
versions). File contents are hashed once per (path, size, mtime) and memoised in
`cache_dir()/eval/file-hashes.json`, so a warm key costs a few stat calls.

An entry (`cache_dir()/eval/base-<key>/`) holds the base's row (ppl, nll, load
time, ...) and, when it fits the budget, the spill: the base's log-probs of every
scored token as float16 (`logprobs.f16`, (tokens, vocab) row-major) plus its
argmax (`argmax.i32`, exact, so top-1 never suffers from fp16 ties). float16
log-probs are accurate to half an ulp (<= 1e-3 for log-probs above -4); the
reader renormalises them (quality.kl_rows), so KL is taken against the
rounded base distribution itself: KL(base~ || base) = 0 and the rounding moves a
model's KL only through the log-ratio, i.e. to second order (measured: the
smollm2 benchmark compares the spill with the exact float32 recompute path).
Half the bytes of float32 means half the disk traffic per model. Entries are written under a
temporary name and renamed when complete; the oldest are evicted beyond the
budget. Without caching the spill lives in a temporary folder removed after the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from quantkit.paths import cache_dir

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
CHUNK = 1 << 24


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def content_digest(path: str | Path, root: Path | None = None) -> str:
    """sha256 over every file of a model folder (relative names and contents), or of one file."""
    root = root or cache_dir() / "eval"
    index_file = root / "file-hashes.json"
    try:
        index: dict[str, list] = json.loads(index_file.read_text()) if index_file.is_file() else {}
    except (json.JSONDecodeError, OSError):
        index = {}
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    outer = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        entry = index.get(str(f))
        if entry is None or entry[:2] != [st.st_size, st.st_mtime_ns]:
            entry = [st.st_size, st.st_mtime_ns, _file_sha(f)]
            index[str(f)] = entry
            changed = True
        outer.update(f"{f.relative_to(p) if f != p else f.name}\0{entry[2]}\n".encode())
    if changed:
        _atomic_write(index_file, json.dumps(index))
    return outer.hexdigest()


def base_key(model_digest: str, windows_digest: str, dtype: torch.dtype, device: torch.device) -> str:
    import transformers

    parts = [LAYOUT_VERSION, model_digest, windows_digest, str(dtype), device.type, torch.__version__,
             transformers.__version__]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def spill_bytes(vocab: int, sizes: list[int]) -> int:
    return sum(sizes) * vocab * 2 + sum(sizes) * 4


class Spill:
    """Base log-probs (fp16) and argmax (int32) of each window's scored tokens, in one folder."""

    def __init__(self, folder: Path, vocab: int, sizes: list[int], mode: str = "c"):
        self.folder, self.vocab, self.sizes = folder, vocab, sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(self.offsets[-1])
        self.lp = np.memmap(folder / "logprobs.f16", dtype=np.float16, mode=mode, shape=(total, vocab))
        self.top = np.memmap(folder / "argmax.i32", dtype=np.int32, mode=mode, shape=(total,))

    def write(self, i: int, logprobs: Tensor, top: Tensor) -> None:
        """Store window i: logprobs (S_i, V) float, top (S_i,) integer."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        self.lp[a:b] = logprobs.detach().to("cpu", torch.float16).numpy()
        self.top[a:b] = top.detach().to("cpu", torch.int32).numpy()

    def read(self, i: int) -> tuple[Tensor, Tensor]:
        """(log-probs (S_i, V) float16, argmax (S_i,) int64) of window i (views of the mapped file)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return torch.from_numpy(np.asarray(self.lp[a:b])), torch.from_numpy(np.asarray(self.top[a:b])).long()

    def flush(self) -> None:
        self.lp.flush()
        self.top.flush()


@dataclass
class BaseEntry:
    folder: Path
    record: dict[str, Any]       # the base row's quality and load figures, plus "vocab", "sizes", "spill"

    def spill(self) -> Spill | None:
        if not self.record.get("spill"):
            return None
        return Spill(self.folder, int(self.record["vocab"]), list(self.record["sizes"]))


class BaseCache:
    """Entries under `root` (default cache_dir()/eval); `persist=False` keeps nothing after `close()`."""

    def __init__(self, root: Path | None = None, budget_bytes: int = 8 << 30, persist: bool = True):
        self.root = Path(root) if root is not None else cache_dir() / "eval"
        self.budget = budget_bytes
        self.persist = persist
        self._temps: list[Path] = []

    def lookup(self, key: str | None) -> BaseEntry | None:
        if key is None or not self.persist:
            return None
        folder = self.root / f"base-{key}"
        meta = folder / "record.json"
        if not meta.is_file():
            return None
        try:
            record = json.loads(meta.read_text())
        except (json.JSONDecodeError, OSError):
            return None
        os.utime(folder)  # most recently used: evicted last
        return BaseEntry(folder, record)

    def new_folder(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".base-tmp-", dir=self.root))
        self._temps.append(tmp)
        return tmp

    def commit(self, key: str | None, tmp: Path, record: dict[str, Any]) -> BaseEntry:
        """Finish an entry written in `tmp`: renamed to its key when persisting, else left temporary."""
        _atomic_write(tmp / "record.json", json.dumps(record))
        if key is None or not self.persist:
            return BaseEntry(tmp, record)
        final = self.root / f"base-{key}"
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._temps.remove(tmp)
        self.evict(keep=final)
        return BaseEntry(final, record)

    def evict(self, keep: Path | None = None) -> None:
        entries = sorted((p for p in self.root.glob("base-*") if p.is_dir() and p != keep),
                         key=lambda p: p.stat().st_mtime)
        sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in entries}
        total = sum(sizes.values()) + (sum(f.stat().st_size for f in keep.iterdir()) if keep else 0)
        for p in entries:
            if total <= self.budget:
                break
            log.info("evicting cached base results %s", p.name)
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]

    def close(self) -> None:
        for tmp in self._temps:
            shutil.rmtree(tmp, ignore_errors=True)
        self._temps.clear()
