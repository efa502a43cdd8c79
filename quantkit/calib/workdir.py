"""Per-block resume: a calibrated run's work folder `OUT.partial/` beside its output.

After each decoder block the pipeline hands its results here (`BlockStore.finished`):

    fingerprint.json         what the run is: model file hashes, method, scheme, options, calibration, seed,
                             save dtype, quantkit version, and (once known) the calibration samples' sha256
    block-00007.safetensors  block 7's checkpoint tensors, exactly as they will be saved (packed codes,
                             its other tensors in the save dtype)
    side-00007.safetensors   small per-block results a method keeps in memory (AWQ's scales and clips)
    inputs-00008.safetensors block 8's input activations (block 7's outputs, float32, one tensor per batch)
    state.json               {"done": 8, "quantized": [...]}: blocks 0..7 are finished

Every file is written to a temporary name and renamed, and state.json is renamed last, so a
process killed at any instant leaves a folder that is consistent up to some block. A resumed
run skips the finished blocks, reads the next block's inputs and continues; the checkpoint is
byte-identical to an uninterrupted run's. The final save reads the block files one tensor at a
time, so no run ever holds all packed codes in memory. The folder is removed after a
successful save and kept after any failure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from quantkit.calib.data import fingerprint as samples_fingerprint
from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint import check_finite, float_entries
from quantkit.formats.shards import Entry, read_header
from quantkit.grid import QuantizedWeight

log = logging.getLogger(__name__)

FINGERPRINT, STATE = "fingerprint.json", "state.json"


class ResumeError(QuantkitError):
    """A work folder that cannot be resumed (another run's, or damaged)."""


def work_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".partial")


def sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            h.update(data)
    return h.hexdigest()


def model_files_fingerprint(kind: str, path: str) -> dict[str, str]:
    """sha256 of every file of a model folder (or of a .gguf file); a hub id stands for itself."""
    p = Path(path)
    if kind == "folder":
        return {f.name: sha256_file(f) for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")}
    if kind == "gguf":
        return {p.name: sha256_file(p)}
    return {"hub": path}


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """'calibration.seed: 0, now 1' for the first key whose value differs, None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
            if diff:
                return diff
        return None
    if old == new:
        return None
    if where.startswith("model."):
        return f"model file {where.removeprefix('model.')}: {'content changed' if old and new else 'added or removed'}"
    return f"{where}: {json.dumps(old)}, now {json.dumps(new)}"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _read_stream(f: Path, prefix: str) -> list[Tensor]:
    """The tensors of an inputs file whose names start with `prefix`, in order (only those are read)."""
    with safe_open(str(f), framework="pt") as fh:
        return [fh.get_tensor(k) for k in sorted(k for k in fh.keys() if k.startswith(prefix))]


class WorkFolder:
    """The work folder of one output: fingerprint checks, locking, and the per-block store."""

    def __init__(self, out: Path, fingerprint: Callable[[], dict[str, Any]], resume: bool | None = None):
        """`fingerprint()` describes the run (computed once, when first needed: it hashes the model files).

        `resume`: None = continue a matching work folder if there is one; False = delete it and start over.
        """
        self.out, self.path = Path(out), work_path(out)
        self._fingerprint_fn, self._fingerprint = fingerprint, None
        self._lock_fd: int | None = None
        self.seconds = 0.0          # time spent on bookkeeping (hashing, writing, reading back)
        self.resumed_at = 0         # first block this process ran
        self.store: BlockStore | None = None
        if self.path.exists():
            self._lock()
            if resume is False or not (self.path / FINGERPRINT).exists() and not any(self.path.glob("block-*")):
                log.info("deleting %s (%s)", self.path, "--no-resume" if resume is False else "nothing to resume")
                self.close()
                shutil.rmtree(self.path)
            else:
                try:
                    self._check(self._read_json(FINGERPRINT))
                except ResumeError:
                    self.close()
                    raise

    # ------------------------------------------------------------------ fingerprint and lock
    @property
    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            t0 = time.perf_counter()
            self._fingerprint = self._fingerprint_fn()
            self.seconds += time.perf_counter() - t0
        return self._fingerprint

    def _read_json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, json.JSONDecodeError):
            raise ResumeError(f"{self.path} has no readable {name}; delete it or pass --no-resume to start over") from None

    def _check(self, recorded: dict[str, Any], samples: str | None = None) -> None:
        current = dict(self.fingerprint)
        if samples is not None:
            current["calibration_samples_sha256"] = samples
        elif "calibration_samples_sha256" in recorded:
            recorded = {k: v for k, v in recorded.items() if k != "calibration_samples_sha256"}
        diff = _first_difference(recorded, current)
        if diff:
            raise ResumeError(f"{self.path} was left by a run with other settings ({diff}); pass --no-resume to "
                              f"start over (deletes it) or choose another --out")

    def _lock(self) -> None:
        """An exclusive lock on the folder: two runs never write one work folder."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection against a concurrent run
            return
        if self._lock_fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ResumeError(f"another quantkit run is using {self.path}; wait for it to end or choose another "
                              f"--out") from None
        self._lock_fd = fd

    def close(self, remove: bool = False) -> None:
        """Release the lock; `remove` deletes the folder (after a successful save)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if remove and self.path.exists():
            shutil.rmtree(self.path)

    def summary(self) -> dict[str, Any]:
        return {"work_folder": str(self.path), "resumed_at_block": self.resumed_at,
                "bookkeeping_seconds": round(self.seconds, 3)}

    def blocks(self, blocks_prefix: str, pack: Callable[[QuantizedWeight], dict[str, Tensor]],
               save_dtype: torch.dtype) -> "BlockStore":
        """The store a calibrated method hands to `run_sequential`."""
        self.store = BlockStore(self, blocks_prefix, pack, save_dtype)
        return self.store

    def stored(self) -> "BlockStore | None":
        """The finished blocks' tensors for the checkpoint writer, if the run went through the store."""
        return self.store


class BlockStore:
    """What `run_sequential` talks to: where to start, and where each finished block goes."""

    def __init__(self, work: WorkFolder, blocks_prefix: str, pack: Callable[[QuantizedWeight], dict[str, Tensor]],
                 save_dtype: torch.dtype):
        self.work, self.path = work, work.path
        self.prefix, self.pack, self.save_dtype = blocks_prefix, pack, save_dtype
        self.done, self.quantized = 0, []  # finished blocks; quantized Linears per finished block

    def _file(self, kind: str, i: int) -> Path:
        return self.path / f"{kind}-{i:05d}.safetensors"

    # ------------------------------------------------------------------ resume
    def resume(self, n_blocks: int, samples: Tensor) -> tuple[int, list[Tensor] | None, dict[str, Any]]:
        """(first block to run, its inputs or None to use the captured ones, side results of the finished blocks)."""
        t0 = time.perf_counter()
        sha = samples_fingerprint(samples)
        w = self.work
        if not w.path.exists():
            w.path.mkdir(parents=True)
        w._lock()
        if not (w.path / FINGERPRINT).is_file():
            _write_json_atomic(w.path / FINGERPRINT, {**w.fingerprint, "calibration_samples_sha256": sha})
            w.seconds += time.perf_counter() - t0
            return 0, None, {}
        w._check(w._read_json(FINGERPRINT), samples=sha)
        state = w._read_json(STATE) if (w.path / STATE).is_file() else {"done": 0, "quantized": []}
        self.done, self.quantized = int(state["done"]), list(state["quantized"])
        if self.done > n_blocks:
            raise ResumeError(f"{w.path} records {self.done} finished blocks, the model has {n_blocks}; "
                              "pass --no-resume to start over")
        kept: dict[str, Any] = {}
        for i in range(self.done):
            if not self._file("block", i).is_file():
                raise ResumeError(f"{w.path} is damaged ({self._file('block', i).name} is missing); pass --no-resume "
                                  "to start over")
            if self._file("side", i).is_file():
                kept.update(load_file(str(self._file("side", i))))
        inputs = None
        if 0 < self.done < n_blocks:
            f = self._file("inputs", self.done)
            if not f.is_file():
                raise ResumeError(f"{w.path} is damaged ({f.name} is missing); pass --no-resume to start over")
            inputs = _read_stream(f, "hidden.")
        for f in w.path.glob("inputs-*.safetensors"):  # a kill between steps may leave an older one
            if f.name != self._file("inputs", self.done).name:
                f.unlink()
        w.resumed_at = self.done
        if self.done:
            log.info("resuming from %s: %d of %d blocks already done", w.path, self.done, n_blocks)
        w.seconds += time.perf_counter() - t0
        return self.done, inputs, kept

    # ------------------------------------------------------------------ one finished block
    def saved_reference(self, i: int) -> list[Tensor] | None:
        """The float model's inputs to block `i` saved beside the quantized ones, or None."""
        f = self._file("inputs", i)
        if not f.is_file():
            return None
        return _read_stream(f, "reference.") or None

    def finished(self, i: int, block: nn.Module, results: dict[str, Any], next_inputs: list[Tensor] | None,
                 last: bool, reference: list[Tensor] | None = None) -> dict[str, Any]:
        """Write block `i` (its packed Linears from `results`, its other tensors from `block`), its side results
        and the next block's inputs; returns what stays in memory (the side results)."""
        t0 = time.perf_counter()
        prefix = f"{self.prefix}.{i}."
        quantized = {k: v for k, v in results.items() if isinstance(v, QuantizedWeight)}
        side = {k: v.detach().cpu().contiguous() for k, v in results.items() if isinstance(v, Tensor)}
        if len(quantized) + len(side) != len(results):
            raise TypeError("block results must be QuantizedWeight (to the checkpoint) or Tensor (kept) values")
        tensors = {prefix + e.name: e.load()
                   for e in float_entries(block, {k.removeprefix(prefix) for k in quantized}, self.save_dtype)}
        t_pack = time.perf_counter()  # packing is the save's own work, done now: not bookkeeping
        for name, qw in quantized.items():
            for k, v in self.pack(qw).items():
                tensors[f"{name}.{k}"] = v.cpu().contiguous()
            if qw.bias is not None:
                tensors[f"{name}.bias"] = qw.bias.to(torch.float16).cpu().contiguous()
        t0 += time.perf_counter() - t_pack
        check_finite(tensors)  # fail at this block, not hours later at the save
        _save_atomic(tensors, self._file("block", i))
        if side:
            _save_atomic(side, self._file("side", i))
        if not last and next_inputs is not None:
            saved = {f"hidden.{k:05d}": h.detach().cpu().contiguous() for k, h in enumerate(next_inputs)}
            for k, h in enumerate(reference or ()):
                saved[f"reference.{k:05d}"] = h.detach().cpu().contiguous()
            _save_atomic(saved, self._file("inputs", i + 1))
        self.done = i + 1
        self.quantized = self.quantized[:i] + [len(quantized)]
        _write_json_atomic(self.path / STATE, {"done": self.done, "quantized": self.quantized})
        self._file("inputs", i).unlink(missing_ok=True)
        self.work.seconds += time.perf_counter() - t0
        return side

    # ------------------------------------------------------------------ the checkpoint writer's view
    @property
    def n_quantized(self) -> int:
        return sum(self.quantized)

    def prefixes(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}.{i}." for i in range(self.done))

    def entries(self) -> list[Entry]:
        out = []
        for i in range(self.done):
            f = self._file("block", i)
            for name, (dtype, shape) in read_header(f).items():
                out.append(Entry(name, dtype, shape, lambda f=f, name=name: self._read(f, name)))
        return out

    def _read(self, f: Path, name: str) -> Tensor:
        t0 = time.perf_counter()
        with safe_open(str(f), framework="pt") as fh:  # opened per tensor: no mapping stays resident
            t = fh.get_tensor(name)
        self.work.seconds += time.perf_counter() - t0
        return t


# Options that do not change a single byte of the checkpoint: a run may resume with other values
# (e.g. a run that died of OOM in memory continues with --offload disk).
RESULT_NEUTRAL_OPTIONS = ("offload", "dump_awq")


def run_fingerprint(job: Any, method: str) -> dict[str, Any]:
    """What must not change between a run and its resumption (`job`: a `QuantJob`)."""
    from quantkit.version import __version__

    return {
        "quantkit_version": __version__,
        "model": model_files_fingerprint(job.source.kind, job.source.path),
        "method": method,
        "scheme": job.scheme.model_dump(mode="json"),
        "options": {k: v for k, v in job.options.model_dump(mode="json").items() if k not in RESULT_NEUTRAL_OPTIONS},
        "calibration": job.calib.model_dump(mode="json"),  # dataset, nsamples, seqlen, seed, batch size
        "save_dtype": str(job.save_dtype).removeprefix("torch."),
        "device": job.device.type,
    }
