"""The interop tests' one guard: skip a whole module where the peer libraries are not importable."""

from __future__ import annotations

import importlib

import pytest


def require(*modules: str) -> None:
    """Import each module, or skip the calling test module (they live in .venv-interop, not quantkit's venv)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # not installed, or installed without a working backend
            pytest.skip(f"{'/'.join(modules)} is not importable here ({type(e).__name__}); run in .venv-interop",
                        allow_module_level=True)


def require_python(python, *modules: str) -> None:
    """Skip the calling test module unless the interpreter `python` (a peer's own venv) exists and imports each
    module: peers such as llm-compressor live in a venv of their own, reached only as a subprocess."""
    import subprocess
    from pathlib import Path

    if not Path(python).is_file():
        pytest.skip(f"{python} does not exist (make venv-llmc)", allow_module_level=True)
    res = subprocess.run([str(python), "-c", "; ".join(f"import {m}" for m in modules)], capture_output=True,
                         check=False)
    if res.returncode:
        pytest.skip(f"{'/'.join(modules)} is not importable by {python}", allow_module_level=True)
