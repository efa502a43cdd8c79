"""Filesystem helpers: the user cache folder, and atomic, durable output folders and files (given the modes a
plain mkdir or open would, under the user's umask).

Durable: a file is fsynced before it is renamed into place and its folder after the rename, so a power cut
leaves either the old name or the complete new file, never a renamed file with no data in it. Every writer
that finalises an output goes through `durable_replace` (files) or `atomic_dir` (folders)."""

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


def fsync_file(path: Path) -> None:
    """Flush a file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename itself was done
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (before the folder is renamed into place)."""
    for root, dirs, files in os.walk(path):
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                fsync_file(Path(root) / f)
        fsync_dir(Path(root))


def durable_replace(tmp: Path, out: Path, synced: bool = False) -> None:
    """Rename `tmp` to `out` durably: fsync the file (unless the writer already did: `synced`), rename,
    fsync the folder."""
    if not synced:
        fsync_file(tmp)
    os.replace(tmp, out)
    fsync_dir(Path(out).parent)


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary name beside it, durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    durable_replace(tmp, path, synced=True)


def _special(out: Path) -> str | None:
    """Why `out` cannot hold an output (a path under /proc, /sys or /dev), or None."""
    resolved = Path(os.path.abspath(out))
    for root in ("/proc", "/sys", "/dev"):
        if resolved == Path(root) or Path(root) in resolved.parents:
            return f"{root} is a special filesystem"
    return None


def check_writable(out: Path) -> None:
    """Refuse, with one line, an output whose folder cannot be written (read-only, a special filesystem)."""
    out = Path(out)
    why = _special(out)
    if why is not None:
        raise QuantkitError(f"cannot write the output {out}: {why}; choose another path")
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QuantkitError(f"cannot write the output {out}: {parent} is not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantkitError(f"cannot write the output {out}: {parent} is not writable (permission denied); "
                            f"choose another path")


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output {out} exists and is not a folder; remove it or choose another path")
    check_writable(out)


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
        fsync_tree(tmp)
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
    fsync_dir(out.parent)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; it replaces `out` only if the body completes."""
    out = Path(out)
    check_writable(out)
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
    durable_replace(tmp, out)


def folder_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
