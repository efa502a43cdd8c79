"""Hooks owned by a context manager: every handle is removed on exit, even on error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class HookSet:
    """`with HookSet() as hs: hs.forward(mod, fn)`; all hooks are gone after the block."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def forward(self, module: nn.Module, fn: Callable) -> None:
        """fn(module, args, output) after each forward."""
        self._handles.append(module.register_forward_hook(fn))

    def pre(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        """fn(module, args[, kwargs]) before each forward."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def inputs(self, module: nn.Module, fn: Callable[[str, Any], None], name: str) -> None:
        """fn(name, x) with the module's first positional input, before each forward."""
        self.pre(module, lambda _m, args: fn(name, args[0]))
