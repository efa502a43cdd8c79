"""`zoo verify` (every hash, again) and `zoo publish` (the passing entries, to the Hub)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.zoo.entry import MANIFEST, read_json
from quantkit.zoo.fingerprint import sha256_file, tree_files
from quantkit.zoo.index import INDEX_JSON

log = logging.getLogger(__name__)


def read_index(out: Path) -> dict[str, Any]:
    out = Path(out)
    if not out.is_dir():
        raise QuantkitError(f"{out} is not a folder; give the --out folder of `quantkit zoo build`")
    data = read_json(out / INDEX_JSON)
    if data is None:
        raise QuantkitError(f"{out} has no readable {INDEX_JSON}; run `quantkit zoo build ZOO.yaml --out {out}` first")
    return data


def verify_entry(folder: Path, manifest_sha256: str | None = None) -> list[str]:
    """Problems of one entry folder: missing or changed files, files the manifest does not list."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["folder is missing"]
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return [f"{MANIFEST} is missing (incomplete entry)"]
    problems = []
    if manifest_sha256 is not None and sha256_file(mpath) != manifest_sha256:
        problems.append(f"{MANIFEST}: sha256 differs from the index")
    manifest = read_json(mpath)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return problems + [f"{MANIFEST} does not parse"]
    listed = manifest["files"]
    for rel, meta in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    for rel in tree_files(folder):
        if rel.as_posix() not in listed and rel.as_posix() != MANIFEST:
            problems.append(f"{rel.as_posix()}: not in the manifest")
    return problems


def verify_zoo(out: str | Path) -> dict[str, list[str]]:
    """{entry name: problems} for every built entry in the index (an empty dict: all hashes match)."""
    out = Path(out)
    data = read_index(out)
    problems: dict[str, list[str]] = {}
    for e in data["entries"]:
        if e["status"] == "error" and "manifest_sha256" not in e:
            continue  # never built: nothing to verify (the build already failed for it)
        found = verify_entry(out / e["path"], e.get("manifest_sha256"))
        if found:
            problems[e["name"]] = found
    return problems


def publish_zoo(out: str | Path, repo_prefix: str, dry_run: bool = False, private: bool = False,
                say: Callable[[str], Any] | None = None) -> list[dict[str, Any]]:
    """Upload every passing entry to `<repo_prefix><name>` (verified first); returns what was (or would be) uploaded."""
    say = say or log.info
    if "/" not in repo_prefix or repo_prefix.startswith("/"):
        raise QuantkitError(f"--repo-prefix {repo_prefix!r} needs the owner and a slash, e.g. myorg/ or myorg/quant-")
    out = Path(out)
    data = read_index(out)
    plans = []
    for e in data["entries"]:
        if e["status"] != "passed":
            say(f"skipping {e['name']} ({e['status']}{': ' + '; '.join(e['failures']) if e['failures'] else ''})")
            continue
        problems = verify_entry(out / e["path"], e.get("manifest_sha256"))
        if problems:
            raise QuantkitError(f"{e['name']} does not verify ({problems[0]}); rebuild it before publishing")
        folder = out / e["path"]
        files = [p.as_posix() for p in tree_files(folder)]
        size = sum((folder / f).stat().st_size for f in files)
        plans.append({"name": e["name"], "repo_id": f"{repo_prefix}{e['name']}", "folder": str(folder),
                      "files": files, "bytes": size, "digest": e.get("digest")})
    for p in plans:
        verb = "would upload" if dry_run else "uploading"
        say(f"{verb} {p['folder']} -> {p['repo_id']} ({len(p['files'])} files, {p['bytes'] / 1e6:.1f} MB)")
        if dry_run:
            continue
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(p["repo_id"], repo_type="model", private=private, exist_ok=True)
            api.upload_folder(repo_id=p["repo_id"], folder_path=p["folder"], repo_type="model", allow_patterns=p["files"],
                              commit_message=f"quantkit zoo: {p['name']} (inputs {str(p['digest'])[:12]})")
        except Exception as exc:  # auth, network, permissions: one line for the user
            raise QuantkitError(f"upload of {p['name']} to {p['repo_id']} failed: {str(exc).splitlines()[0]}") from None
    return plans
