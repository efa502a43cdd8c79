"""The method registry: one name -> one `Method`, built in or from a plugin.

Built-in methods are listed as import strings so nothing heavy is imported to
list them. Third-party packages add methods through the entry-point group
`quantkit.methods` (name = "package.module:MethodClass").
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from quantkit.errors import UnknownNameError

ENTRY_POINT_GROUP = "quantkit.methods"

BUILTIN: dict[str, str] = {
    "rtn": "quantkit.methods.rtn:RTN",
    "gptq": "quantkit.methods.gptq_method:GPTQ",
    "nf4": "quantkit.methods.bnb:NF4",
    "fp4": "quantkit.methods.bnb:FP4",
    "int8": "quantkit.methods.bnb:INT8",
    "awq": "quantkit.methods.awq_method:AWQ",
    "signround": "quantkit.methods.signround.run:SignRound",
}


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    needs_calibration: bool
    formats: tuple[str, ...]


class Method(Protocol):
    """A quantization method. `quantize(job)` returns an artifact that can `save(folder)`."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_calibration: ClassVar[bool]
    formats: ClassVar[tuple[str, ...]]
    # uses_scheme (optional, default True): False for methods whose bits/grid are fixed (bitsandbytes);
    # the CLI then refuses --bits/--group-size/--preset for them.
    Options: ClassVar[type[BaseModel]]  # method-specific options, extra="forbid"

    def quantize(self, job: Any) -> Any: ...


def _targets() -> dict[str, str]:
    targets = dict(BUILTIN)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, ep.value)
    return targets


def _load(target: str) -> type:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def method_names() -> list[str]:
    return sorted(_targets())


def get_method(name: str) -> Method:
    targets = _targets()
    if name not in targets:
        raise UnknownNameError(f"unknown method {name!r}; choose one of: {', '.join(sorted(targets))}")
    return _load(targets[name])()


def list_methods() -> list[MethodInfo]:
    infos = []
    for name in method_names():
        cls = _load(_targets()[name])
        infos.append(MethodInfo(name, cls.description, cls.needs_calibration, tuple(cls.formats)))
    return infos
