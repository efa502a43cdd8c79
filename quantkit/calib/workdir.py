"""Per-block resume: a calibrated run's work folder `OUT.partial/` beside its output.

After each decoder block the pipeline hands its results here (`BlockStore.finished`):

    fingerprint.json         what the run is: model file hashes, method, scheme, options, calibration, seed,
                             save dtype, quantkit version, and (once known) the calibration samples' sha256
    block-00007.safetensors  block 7's checkpoint tensors, exactly as they will be saved (packed codes,
                             its other tensors in the save dtype)
    side-00007.safetensors   small per-block results a method keeps in memory (AWQ's scales and clips)
    inputs-00008.safetensors block 8's input activations (block 7's outputs, float32, one tensor per batch)
    state.json               {"done": 8, "quantized": [...], "files": {name: {"size", "xxh3_128"}}, "checksum"}:
                             blocks 0..7 are finished; the size and checksum of every file above, taken
                             as it was written; the checksum of the state itself

Every file is written to a temporary name, fsynced, renamed and its folder fsynced
(`formats.safetensors_io.save`), and state.json is renamed last, so a process killed (or a machine
that loses power) at any instant leaves a folder that is consistent up to some block. A resumed run
proves what it reads before trusting it (`verify`): every recorded file must have its size and
checksum. A damaged or missing block is recomputed when its inputs survive (block 0's always do: they
come from the calibration text; a later block's when it is the one the run was at); otherwise the run
stops with one line naming the file and `--no-resume`. So a resumed run's checkpoint is byte-identical
to an uninterrupted run's, or the run fails. The final save reads the block files one tensor at a
time, so no run ever holds all packed codes in memory. The folder is removed after a successful save
and kept after any failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calib.data import fingerprint as samples_fingerprint
from quantkit.calib.runid import first_difference, run_fingerprint  # noqa: F401 - run_fingerprint: api's import
from quantkit.errors import CheckpointError, QuantkitError
from quantkit.formats import safetensors_io as st
from quantkit.formats.checkpoint import check_finite, float_entries
from quantkit.formats.shards import Entry
from quantkit.grid import QuantizedWeight
from quantkit.paths import durable_replace

log = logging.getLogger(__name__)

FINGERPRINT, STATE = "fingerprint.json", "state.json"


class ResumeError(QuantkitError):
    """A work folder that cannot be resumed (another run's, or damaged)."""


def work_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".partial")


FAULT_ENV = "QUANTKIT_TEST_FAULT"
# the steps of one block's write, in order: a test kills the process at "<step>:<block>" (FAULT_ENV)
FAULT_STEPS = ("block-written", "block-renamed", "side-written", "side-renamed", "inputs-written",
               "inputs-renamed", "state-written", "state-renamed", "cleaned")


def _fault(step: str, i: int) -> None:
    """TEST HOOK (tests/faults), inert unless $QUANTKIT_TEST_FAULT is "<step>:<block>": SIGKILL this process
    at that step of block i's write, as a power cut or the OOM killer would."""
    if os.environ.get(FAULT_ENV) == f"{step}:{i}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _write_json_atomic(path: Path, data: dict[str, Any], fault: Callable[[Path], None] | None = None) -> None:
    """`data` as `path`, through a temporary name, durably (`fault(tmp)`: a test's point before the rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if fault is not None:
        fault(tmp)
    durable_replace(tmp, path, synced=True)


def _state_checksum(state: dict[str, Any]) -> str:
    import xxhash

    body = {k: v for k, v in state.items() if k != "checksum"}
    return xxhash.xxh3_128(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_stream(f: Path, prefix: str) -> list[Tensor]:
    """The tensors of an inputs file whose names start with `prefix`, in order (only those are read)."""
    return list(st.load(f, lambda k: k.startswith(prefix)).values())


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
        diff = first_difference(recorded, current)
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
        self.files: dict[str, dict[str, Any]] = {}  # file name -> {"size", "xxh3_128"}, as written

    def _file(self, kind: str, i: int) -> Path:
        return self.path / f"{kind}-{i:05d}.safetensors"

    def _damaged(self, why: str) -> ResumeError:
        return ResumeError(f"{self.path} is damaged ({why}); pass --no-resume to start over (it deletes the folder)")

    # ------------------------------------------------------------------ resume
    def _read_state(self) -> dict[str, Any]:
        if not (self.path / STATE).is_file():
            return {"done": 0, "quantized": [], "files": {}}
        state = self.work._read_json(STATE)
        try:
            ok = state.get("checksum") == _state_checksum(state) and isinstance(state["files"], dict)
            done, quantized = int(state["done"]), [int(q) for q in state["quantized"]]
        except (AttributeError, KeyError, TypeError, ValueError):
            ok = False
        if not ok or len(quantized) != done:
            raise self._damaged(f"{STATE} does not match its checksum")
        return state

    def _intact(self, name: str) -> str | None:
        """None if `name` has the size and checksum recorded when it was written, else what is wrong."""
        rec, f = self.files.get(name), self.path / name
        if rec is None:
            return f"{name} is not recorded in {STATE}"
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec["size"]:
            return f"{name} has {size:,} bytes, {rec['size']:,} were written"
        if st.checksum(f).xxh3 != rec["xxh3_128"]:
            return f"{name} does not match its checksum"
        return None

    def verify(self, n_blocks: int) -> int:
        """The block to continue from, after proving every file it relies on (see the module docstring)."""
        start, bad = self.done, None
        for i in range(self.done):
            names = [self._file("block", i).name] + [n for n in (self._file("side", i).name,) if n in self.files]
            bad = next((why for why in map(self._intact, names) if why), None)
            if bad:
                start = i
                break
        if bad is None and 0 < start < n_blocks:
            bad = self._intact(self._file("inputs", start).name)
        if bad is None:
            return start
        if start == 0:  # block 0's inputs come from the calibration text: it can always be recomputed
            log.warning("%s: %s; recomputing from block %d", self.path, bad, start)
            return start
        raise self._damaged(bad + ("" if start == self.done else f"; block {start}'s inputs were not kept"))

    def resume(self, n_blocks: int, samples: Tensor) -> tuple[int, list[Tensor] | None, dict[str, Any]]:
        """(first block to run, its inputs or None to use the captured ones, side results of the finished blocks)."""
        t0 = time.perf_counter()
        sha = samples_fingerprint(samples)
        w = self.work
        if not w.path.exists():
            w.path.mkdir(parents=True)
        w._lock()
        for tmp in w.path.glob(".*.tmp"):  # a write killed before its rename
            tmp.unlink()
        if not (w.path / FINGERPRINT).is_file():
            _write_json_atomic(w.path / FINGERPRINT, {**w.fingerprint, "calibration_samples_sha256": sha})
            w.seconds += time.perf_counter() - t0
            return 0, None, {}
        w._check(w._read_json(FINGERPRINT), samples=sha)
        state = self._read_state()
        self.done, self.quantized, self.files = int(state["done"]), list(state["quantized"]), dict(state["files"])
        if self.done > n_blocks:
            raise ResumeError(f"{w.path} records {self.done} finished blocks, the model has {n_blocks}; "
                              "pass --no-resume to start over")
        start = self.verify(n_blocks)
        kept: dict[str, Any] = {}
        for i in range(start):
            if self._file("side", i).name in self.files:
                kept.update(st.load(self._file("side", i)))
        inputs = _read_stream(self._file("inputs", start), "hidden.") if 0 < start < n_blocks else None
        self.done, self.quantized = start, self.quantized[:start]
        keep = {self._file(k, i).name for i in range(start) for k in ("block", "side")} | {self._file("inputs", start).name}
        self.files = {k: v for k, v in self.files.items() if k in keep}
        for f in w.path.glob("*.safetensors"):  # a later block's files, or an older inputs file, are not used
            if f.name not in keep:
                f.unlink()
        w.resumed_at = start
        if start:
            log.info("resuming from %s: %d of %d blocks already done", w.path, start, n_blocks)
        w.seconds += time.perf_counter() - t0
        return start, inputs, kept

    # ------------------------------------------------------------------ one finished block
    def saved_reference(self, i: int) -> list[Tensor] | None:
        """The float model's inputs to block `i` saved beside the quantized ones, or None."""
        f = self._file("inputs", i)
        if not f.is_file():
            return None
        return _read_stream(f, "reference.") or None

    def _save(self, kind: str, index: int, tensors: dict[str, Tensor], block: int) -> None:
        """One file of block `block`'s write, durably, its size and checksum recorded (the test's fault points)."""
        f = self._file(kind, index)
        self.files[f.name] = st.save(tensors, f, before_rename=lambda _tmp: _fault(f"{kind}-written", block)).record()
        _fault(f"{kind}-renamed", block)

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
        self._save("block", i, tensors, i)
        if side:
            self._save("side", i, side, i)
        if not last and next_inputs is not None:
            saved = {f"hidden.{k:05d}": h.detach().cpu().contiguous() for k, h in enumerate(next_inputs)}
            for k, h in enumerate(reference or ()):
                saved[f"reference.{k:05d}"] = h.detach().cpu().contiguous()
            self._save("inputs", i + 1, saved, i)
        self.done = i + 1
        self.quantized = self.quantized[:i] + [len(quantized)]
        self.files.pop(self._file("inputs", i).name, None)
        state = {"done": self.done, "quantized": self.quantized, "files": self.files}
        _write_json_atomic(self.path / STATE, {**state, "checksum": _state_checksum(state)},
                           fault=lambda _tmp: _fault("state-written", i))
        _fault("state-renamed", i)
        self._file("inputs", i).unlink(missing_ok=True)
        _fault("cleaned", i)
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
            for name, info in st.scan([self._file("block", i)]).items():
                out.append(Entry(name, info.dtype, info.shape, lambda info=info, name=name: self._read(info, name)))
        return out

    def _read(self, info: st.TensorInfo, name: str) -> Tensor:
        t0 = time.perf_counter()
        try:
            t = st.read_tensor(info, name)  # seek + read: no mapping stays resident
        except CheckpointError as e:
            raise self._damaged(str(e)) from None
        self.work.seconds += time.perf_counter() - t0
        return t
