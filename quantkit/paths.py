"""Filesystem helpers: the user cache folder and atomic output folders and files (given the modes a plain
mkdir or open would, under the user's umask)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import OutputExistsError, QuantkitError


def cache_dir() -> Path:
    """$QUANTKIT_CACHE, else $XDG_CACHE_HOME/quantkit, else ~/.cache/quantkit."""
    if env := os.environ.get("QUANTKIT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantkit"


def umask() -> int:
    """The process's file mode creation mask, read without changing it where /proc allows (no window in
    which another thread would create files with a zero mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output {out} exists and is not a folder; remove it or choose another path")


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the body completes.

    A failure (or a kill) never leaves a half-written `out`: at worst a `.out.tmp-*` folder.
    """
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # force: move the old one aside first, so `out` is never half-replaced
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    os.chmod(out, 0o777 & ~umask())  # mkdtemp made it 0700


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; it replaces `out` only if the body completes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp made it 0600; a plain open() would give 0644 under umask 022
    os.replace(tmp, out)


def folder_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
