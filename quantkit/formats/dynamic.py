"""The GPTQ format's per-module overrides: `quantization_config["dynamic"]`, as GPTQModel defines it and
gptqmodel, transformers (through gptqmodel) and vLLM read it.

    "dynamic": {"+:^model\\.layers\\.3\\.mlp\\.down_proj$": {"bits": 8, "group_size": 128}, ...}

Each key is a regular expression over full module names, optionally prefixed "+:" (a positive override:
these fields replace the base config's for the matching Linears) or "-:" (the matching modules are not
quantized). The first key that matches (`re.match`, in insertion order) decides. quantkit writes one
anchored, escaped key per overridden Linear, sorted by name, so the config is deterministic and any regex
dialect reads it as an exact match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from quantkit.errors import CheckpointError
from quantkit.scheme import ModuleGrid, QuantScheme

POSITIVE, NEGATIVE = "+:", "-:"
GRID_KEYS = ("bits", "group_size")


def module_key(name: str) -> str:
    """The dynamic key that matches exactly the module `name`."""
    return f"{POSITIVE}^{re.escape(name)}$"


def dynamic_config(scheme: QuantScheme) -> dict[str, dict[str, int]]:
    """The overrides of `scheme` whose grid differs from its base grid, as GPTQ `dynamic` entries."""
    base = (scheme.bits, scheme.group_size)
    return {module_key(name): {"bits": g.bits, "group_size": g.group_size}
            for name, g in sorted(scheme.overrides.items()) if (g.bits, g.group_size) != base}


class DynamicGrids:
    """Resolves a checkpoint's `dynamic` config: each module's grid (or None where a "-:" key skips it)."""

    def __init__(self, dynamic: Mapping[str, Any] | None, base: ModuleGrid):
        self.base = base
        self.rules: list[tuple[re.Pattern[str], bool, dict[str, Any]]] = []
        if dynamic is None:
            return
        if not isinstance(dynamic, Mapping):
            raise CheckpointError(f"GPTQ quantization_config.dynamic must be an object, got {type(dynamic).__name__}")
        for key, fields in dynamic.items():
            negative = key.startswith(NEGATIVE)
            raw = key[2:] if key.startswith((POSITIVE, NEGATIVE)) else key
            try:
                pattern = re.compile(raw)
            except re.error as e:
                raise CheckpointError(f"GPTQ dynamic key {key!r} is not a regular expression: {e}") from None
            if not isinstance(fields, Mapping):
                raise CheckpointError(f"GPTQ dynamic entry {key!r} must be an object of overrides")
            self.rules.append((pattern, negative, dict(fields)))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def grid(self, name: str) -> ModuleGrid | None:
        """The grid the module `name` is stored on; None when a negative key leaves it unquantized."""
        for pattern, negative, fields in self.rules:
            if pattern.match(name):
                if negative:
                    return None
                try:
                    return ModuleGrid(bits=fields.get("bits", self.base.bits),
                                      group_size=fields.get("group_size", self.base.group_size))
                except ValueError as e:
                    raise CheckpointError(f"GPTQ dynamic override for {name}: {e}") from None
        return self.base


def read_dynamic(qc: Mapping[str, Any], base: ModuleGrid) -> DynamicGrids:
    return DynamicGrids(qc.get("dynamic"), base)
