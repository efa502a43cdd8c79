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
