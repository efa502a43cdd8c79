"""Input fingerprints: what an artifact was built from, so an unchanged input is never rebuilt.

fingerprint = sha256 over
  - the sha256 of every file of the base model (weights, config, tokenizer),
  - the canonical effective recipe (`Recipe.canonical()`),
  - the calibration sample hash (`quantkit.calib.data.fingerprint` of the exact token ids;
    None for methods without calibration),
  - the quantkit version.

Hashing a base model of many GB on every build would dominate a no-op build, so file
hashes are remembered in a small JSON cache keyed by (absolute path, size, mtime_ns).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.version import __version__
from quantkit.zoo.recipe import Recipe

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tree_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, relative, sorted; hidden files and folders are left out."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(rel)
    return sorted(out, key=lambda r: r.as_posix())


class HashCache:
    """sha256 of files, remembered by (path, size, mtime_ns) in a JSON file (None = in memory only)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self.data: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (json.JSONDecodeError, OSError):
                self.data = {}
        self.dirty = False

    def sha(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        key = str(path)
        hit = self.data.get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            return hit["sha256"]
        digest = sha256_file(path)
        self.data[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
        self.dirty = False


def local_model(model: str) -> tuple[Path, str]:
    """(local folder or .gguf file, kind) of a model name; hub ids are downloaded to the HF cache first."""
    from quantkit.models.sources import resolve

    src = resolve(model)
    if src.kind != "hub":
        return Path(src.path), src.kind
    from huggingface_hub import snapshot_download

    from quantkit.errors import ModelSourceError

    try:
        folder = snapshot_download(src.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                             "*.tiktoken", "README.md", "LICENSE*"])
    except Exception as e:  # network, gated repo, unknown id: one line for the user
        raise ModelSourceError(f"cannot download {src.path} from the hub: {str(e).splitlines()[0]}") from None
    return Path(folder), "folder"


def base_hashes(path: Path, cache: HashCache) -> dict[str, str]:
    """{relative file name: sha256} of a model folder (or {name: sha256} of a single .gguf file)."""
    path = Path(path)
    if path.is_file():
        return {path.name: cache.sha(path)}
    return {rel.as_posix(): cache.sha(path / rel) for rel in tree_files(path)}


def calibration_hash(model_path: Path, recipe: Recipe) -> str | None:
    """Hash of the exact calibration token ids the recipe's method will see (None without calibration)."""
    if not recipe.needs_calibration():
        return None
    from quantkit.calib.data import calibration_samples, fingerprint
    from quantkit.models.sources import load_tokenizer, resolve

    c = recipe.calibration
    tok = load_tokenizer(resolve(str(model_path)))
    return fingerprint(calibration_samples(tok, c.dataset, c.nsamples, c.seqlen, c.seed, c.text_field))


@dataclass(frozen=True)
class Inputs:
    """Everything an entry is built from; `digest` is the one hash compared between builds."""

    base_files: dict[str, str]
    recipe: str
    calibration: str | None
    quantkit_version: str = __version__

    def as_dict(self) -> dict[str, Any]:
        return {"base_files": self.base_files, "recipe_sha256": sha256_text(self.recipe),
                "calibration_sha256": self.calibration, "quantkit_version": self.quantkit_version,
                "digest": self.digest}

    @property
    def digest(self) -> str:
        payload = json.dumps({"base_files": self.base_files, "recipe": self.recipe, "calibration": self.calibration,
                              "quantkit_version": self.quantkit_version}, sort_keys=True)
        return sha256_text(payload)


def changes(old: dict[str, Any] | None, new: Inputs) -> list[str]:
    """Why a stored input fingerprint differs from `new` (empty: nothing changed)."""
    if not old:
        return ["new"]
    if old.get("digest") == new.digest:
        return []
    why = []
    if old.get("base_files") != new.base_files:
        why.append("base model changed")
    if old.get("recipe_sha256") != sha256_text(new.recipe):
        why.append("recipe changed")
    if old.get("calibration_sha256") != new.calibration:
        why.append("calibration data changed")
    if old.get("quantkit_version") != new.quantkit_version:
        why.append("quantkit version changed")
    return why or ["fingerprint changed"]
