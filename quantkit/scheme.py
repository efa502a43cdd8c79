"""The weight-quantization scheme: validated data, plus presets as plain dicts.

A scheme says *what* integer grid the weights go on (bits, group size, symmetry,
act-order); methods say *how* the integers are chosen (RTN, GPTQ, AWQ).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from quantkit.errors import SchemeError, UnknownNameError

DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "*embed_tokens*", "*embed_positions*", "*wte*", "*wpe*")

PRESETS: dict[str, dict[str, Any]] = {
    "w4g128": {"bits": 4, "group_size": 128},
    "w4g64": {"bits": 4, "group_size": 64},
    "w4g32": {"bits": 4, "group_size": 32},
    "w3g64": {"bits": 3, "group_size": 64},
    "w8": {"bits": 8, "group_size": -1},
}


class QuantScheme(BaseModel):
    """Integer grid for the weights of every quantized Linear.

    bits:         2, 3, 4 or 8 bits per weight.
    group_size:   inputs sharing one (scale, zero); -1 means one group per output channel.
    sym:          symmetric grid (zero fixed at 2**(bits-1)) or asymmetric (integer zero per group).
    desc_act:     GPTQ act-order: quantize columns by decreasing Hessian diagonal (writes g_idx).
    static_groups: with desc_act, fix group parameters before reordering (keeps g_idx trivial order).
    skip:         fnmatch patterns of module names (full or last component) left in full precision.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    sym: bool = False
    desc_act: bool = False
    static_groups: bool = False
    skip: tuple[str, ...] = DEFAULT_SKIP

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError(f"group_size must be -1 (per channel) or positive, got {v}")
        if v > 0 and v % 32:
            raise ValueError(f"group_size must be a multiple of 32 (packing needs it), got {v}")
        return v

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def skips(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in self.skip)

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Refuse a scheme that cannot apply: `shapes` maps Linear name -> (out_features, in_features)."""
        for name, (out_f, in_f) in shapes.items():
            if self.group_size > 0 and in_f % self.group_size:
                fits = [g for g in (128, 64, 32) if all(i % g == 0 for _, i in shapes.values())]
                options = [str(g) for g in fits + [-1]]
                hint = ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]
                raise SchemeError(
                    f"group_size {self.group_size} does not divide in_features {in_f} of {name}; use {hint}"
                )
            if in_f % 32:
                raise SchemeError(f"in_features {in_f} of {name} is not a multiple of 32; add it to --skip")
            if out_f % 32:
                raise SchemeError(f"out_features {out_f} of {name} is not a multiple of 32; add it to --skip")


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "scheme"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid scheme: " + "; ".join(parts)


def make_scheme(preset: str | None = None, **overrides: Any) -> QuantScheme:
    """Build a scheme from an optional preset name and field overrides (None values are ignored)."""
    fields: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UnknownNameError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if "skip" in fields:
        fields["skip"] = tuple(fields["skip"])
    try:
        return QuantScheme(**fields)
    except ValidationError as err:
        raise SchemeError(_one_line(err)) from None
