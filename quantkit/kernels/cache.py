"""Packed-weight cache: a checkpoint's kernel buffers, packed once, read back on later loads.

Packing for torch's int4/int8 CPU matmuls reshuffles every code nibble (a byte-granular
transpose: about 0.7 s per billion 4-bit weights on one core), so a packing load costs several
times the reference loader, which only maps the checkpoint. The first load with a cacheable
kernel writes the packed buffers of every layer it served to one safetensors file; a later
load of the same checkpoint reads them instead of the checkpoint's qweight/qzeros/scales.

Key (sha256): the cache layout version, quantkit and torch versions, the CPU's capability
and machine, the kernels available in this process, the requested kernel, dtype and device
type, the checkpoint folder's absolute path, its quantization_config, and (name, size,
mtime_ns, inode) of each of its weight files. Rewriting a checkpoint changes its files'
mtime and so the key; no file content is hashed (that would cost as much as packing).

Entries live in `cache_dir()/packed/<key>.safetensors` (`$QUANTKIT_CACHE`; the folder alone:
`$QUANTKIT_PACK_CACHE_DIR`), written under a
temporary name and renamed when complete; a hit refreshes the entry's mtime and the least
recently used entries are removed beyond `$QUANTKIT_PACK_CACHE_GB` (default 16). A file
that cannot be read is removed and the load packs again. `$QUANTKIT_PACK_CACHE=0` (or
`quantkit.load(..., pack_cache=False)`) turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.formats.layouts import Layout
from quantkit.formats.safetensors_io import Entry, open_file, write_entries
from quantkit.kernels.base import KernelLinear
from quantkit.paths import cache_dir, durable_replace
from quantkit.version import __version__

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ENABLE_ENV = "QUANTKIT_PACK_CACHE"
BUDGET_ENV = "QUANTKIT_PACK_CACHE_GB"
DIR_ENV = "QUANTKIT_PACK_CACHE_DIR"
DEFAULT_BUDGET_GB = 16.0
_META = "quantkit_packed"
WRITER_THREAD = "quantkit-pack-cache-writer"
STALE_TMP_SECONDS = 3600  # a temporary file this old was left by a killed writer


def cache_enabled(requested: bool | None) -> bool:
    """`pack_cache=` if given, else on unless $QUANTKIT_PACK_CACHE is 0/false/no/off."""
    if requested is not None:
        return requested
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def pack_cache_dir() -> Path:
    return Path(os.environ[DIR_ENV]) if os.environ.get(DIR_ENV) else cache_dir() / "packed"


def budget_bytes() -> int:
    try:
        gb = float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_GB))
    except ValueError:
        log.warning("$%s is not a number; using %s GB", BUDGET_ENV, DEFAULT_BUDGET_GB)
        gb = DEFAULT_BUDGET_GB
    return int(gb * 2**30)


def cache_key(folder: Path, weight_files: list[Path], qc: dict[str, Any], kernel: str, dtype: torch.dtype,
              device: torch.device) -> str:
    from quantkit.kernels.registry import KERNELS

    available = [name for name, cls in KERNELS.items() if device.type in cls.devices and not cls.unavailable()]
    files = []
    for f in weight_files:
        st = f.stat()
        files.append([f.name, st.st_size, st.st_mtime_ns, st.st_ino])
    parts = {"v": CACHE_VERSION, "quantkit": __version__, "torch": torch.__version__,
             "cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
             "kernels": sorted(available), "kernel": kernel, "dtype": str(dtype), "device": device.type,
             "folder": str(folder.resolve()), "qc": qc, "files": files}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


ALIGN = 64  # torch's int8 matmul (`_weight_int8pack_mm`, AVX512) crashes on weights not 64-byte aligned


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` as read (a view of the mapped file) if it lies 64-byte aligned, else an aligned copy."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _write_aligned(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file whose data starts 64-byte aligned, tensors of whole 64-byte multiples first:
    those (every packed weight) then map aligned and are read lazily, like the checkpoint itself."""
    entries = [Entry(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]
    entries.sort(key=lambda e: (e.nbytes % ALIGN != 0, e.name))
    write_entries(Path(path), entries, metadata, align=ALIGN, in_order=True, fsync=True)


class PackCache:
    """One checkpoint's entry: `read()` the cached kernel modules, or `write(model)` them after packing."""

    def __init__(self, key: str, root: Path | None = None):
        self.root = Path(root) if root is not None else pack_cache_dir()
        self.path = self.root / f"{key}.safetensors"

    @classmethod
    def of(cls, folder: Path, weight_files: list[Path], qc: dict[str, Any], kernel: str, dtype: torch.dtype,
           device: torch.device) -> "PackCache":
        return cls(cache_key(folder, weight_files, qc, kernel, dtype, device))

    def read(self, layout: Layout, dtype: torch.dtype) -> dict[str, KernelLinear] | None:
        """{module name: kernel module on the CPU} from the entry, or None (no entry, or an unreadable one)."""
        from quantkit.kernels.registry import KERNELS

        if not self.path.is_file():
            return None
        try:
            with open_file(self.path) as fh:
                meta = json.loads(fh.metadata()[_META])
                if meta["v"] != CACHE_VERSION:
                    raise ValueError(f"layout version {meta['v']}")
                out = {}
                for name, rec in meta["layers"].items():
                    buffers = {b: _aligned(fh.get_tensor(f"{name}:{b}")) for b in rec["buffers"]}
                    buffers.update(dict.fromkeys(rec["none"]))
                    out[name] = KERNELS[rec["kernel"]].restore(rec, layout, dtype, buffers)
        except Exception as e:  # a truncated or foreign file: drop it and pack again
            log.warning("packed-weight cache %s is unreadable (%s); packing again", self.path,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.path.unlink(missing_ok=True)
            return None
        os.utime(self.path)  # most recently used
        log.info("packed weights of %d layers read from the cache %s", len(out), self.path)
        return out

    def write(self, model: nn.Module, background: bool = False) -> int:
        """Store the buffers of every cacheable kernel module of `model`; returns the layers stored.

        `background`: the file is written by a (non-daemon) thread, so the load returns as soon as it has
        packed; the interpreter waits for the thread at exit, and `wait_for_writes()` joins it. The
        buffers are only read. Failures (disk full, read-only cache folder) only log."""
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, dict[str, Any]] = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, KernelLinear) or not mod.cacheable:
                continue
            rec = mod.cache_record()
            rec["buffers"], rec["none"] = [], []
            for b, t in mod._buffers.items():  # registered buffers, None ones included (restored as None)
                rec["none" if t is None else "buffers"].append(b)
                if t is not None:
                    tensors[f"{name}:{b}"] = t.detach().to("cpu").contiguous()
            layers[name] = rec
        if not layers:
            return 0
        if background:
            threading.Thread(target=self._store, args=(tensors, layers), name=WRITER_THREAD).start()
        else:
            self._store(tensors, layers)
        return len(layers)

    def _store(self, tensors: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.root)
            os.close(fd)
            try:
                _write_aligned(tmp, tensors, {_META: json.dumps({"v": CACHE_VERSION, "layers": layers})})
                durable_replace(Path(tmp), self.path, synced=True)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as e:
            log.warning("packed weights not cached (%s): the next load packs again", e)
            return
        log.info("packed weights of %d layers cached in %s", len(layers), self.path)
        evict(self.root, budget_bytes(), keep=self.path)


def wait_for_writes(timeout: float | None = None) -> None:
    """Join the cache writes still running in this process (tests; a caller about to read the cache)."""
    for t in threading.enumerate():
        if t.name == WRITER_THREAD:
            t.join(timeout)


def evict(root: Path, budget: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries until the folder holds at most `budget` bytes (and the
    temporary files of writers killed over an hour ago)."""
    entries = []
    for p in root.glob("*.safetensors"):
        try:
            st = p.stat()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        entries.append((st.st_mtime_ns, st.st_size, p))
    for p in root.glob(".*.safetensors.*"):  # temporary files of writers killed mid-write
        try:
            if time.time() - p.stat().st_mtime > STALE_TMP_SECONDS:
                p.unlink()
        except FileNotFoundError:
            pass
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, p in sorted(entries):
        if total <= budget:
            break
        if p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= size
        removed.append(p)
    if removed:
        log.info("packed-weight cache: removed %d least recently used entries (budget %.1f GB)",
                 len(removed), budget / 2**30)
    return removed
