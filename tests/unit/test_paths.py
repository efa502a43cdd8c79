"""Atomic outputs get the modes a plain open() or mkdir would: the user's umask, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.paths import atomic_dir, atomic_file, umask


@contextmanager
def user_umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o077, 0o600, 0o700)])
def test_atomic_outputs_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    with user_umask(mask):
        assert umask() == mask
        with atomic_file(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a.json").write_text("{}")
        with open(tmp_path / "plain.bin", "wb") as fh:  # what the user expects: the same as a plain open()
            fh.write(b"x")
    assert mode(tmp_path / "out.bin") == file_mode == mode(tmp_path / "plain.bin")
    assert mode(tmp_path / "folder") == dir_mode and mode(tmp_path / "folder" / "a.json") == file_mode


def test_convert_to_gguf_writes_a_0644_file(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    with user_umask(0o022):
        res = CliRunner().invoke(app, ["convert", str(tiny_llama), "--to", "gguf", "--type", "q8_0", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert mode(out) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left beside it
