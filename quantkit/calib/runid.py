"""What a calibrated run is, for its work folder: the fingerprint a resumed run must match, and the first
difference when it does not."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


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


def first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """'calibration.seed: 0, now 1' for the first key whose value differs, None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            diff = first_difference(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
            if diff:
                return diff
        return None
    if old == new:
        return None
    if where.startswith("model."):
        return f"model file {where.removeprefix('model.')}: {'content changed' if old and new else 'added or removed'}"
    return f"{where}: {json.dumps(old)}, now {json.dumps(new)}"


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
        **({"format": job.fmt} if getattr(job, "fmt", None) else {}),  # blocks are stored in the format's layout
    }
