"""The method registry: one name -> one `Method`, built in or from a plugin.

Built-in methods are listed as import strings so nothing heavy is imported to
list them. Third-party packages add methods through the entry-point group
`quantkit.methods` (name = "package.module:MethodClass").

`Method` is the contract every method meets (`quantkit.methods.base.MethodBase` gives the
defaults). It is declarative: the planner, the memory check, the CLI and the zoo read what a
method declares through `method_class(name)` and never branch on a method's name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from quantkit.errors import UnknownNameError

ENTRY_POINT_GROUP = "quantkit.methods"

BUILTIN: dict[str, str] = {
    "rtn": "quantkit.methods.rtn.run:RTN",
    "gptq": "quantkit.methods.gptq.run:GPTQ",
    "nf4": "quantkit.methods.bnb.run:NF4",
    "fp4": "quantkit.methods.bnb.run:FP4",
    "int8": "quantkit.methods.bnb.run:INT8",
    "awq": "quantkit.methods.awq.run:AWQ",
    "awq-gptq": "quantkit.methods.composed:AWQGPTQ",
    "smoothquant": "quantkit.methods.composed:SmoothQuant",
    "smoothquant-rtn": "quantkit.methods.composed:SmoothQuantRTN",
    "signround": "quantkit.methods.signround.run:SignRound",
}
DEFAULT_METHOD = "rtn"  # what `quantkit quantize` uses without --method


class Method(Protocol):
    """A quantization method: what it needs, declared as class-level data, and `quantize(job)`.

    `quantize(job)` returns an artifact that can `save(folder, max_shard_size)`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_calibration: ClassVar[bool]        # runs block by block on calibration text
    formats: ClassVar[tuple[str, ...]]       # checkpoint formats it writes (the first is what it writes)
    uses_scheme: ClassVar[bool]              # False: its grid is fixed, only scheme.skip applies
    scheme_bits: ClassVar[tuple[int, ...]]   # the bits it accepts (fixed-grid methods: the one they store)
    quantizes_on_load: ClassVar[bool]        # transformers quantizes while it loads the model (bitsandbytes)
    resumable: ClassVar[bool]                # finished blocks go to the work folder; a killed run continues
    tokenizes_first: ClassVar[bool]          # calibration text is tokenized before the model is loaded
    replaces_weights: ClassVar[bool]         # assigns new weight tensors block by block (mapped pages stay)
    card_tags: ClassVar[tuple[str, ...]]     # model-card tags of a fixed-grid method (others: from the scheme)
    Options: ClassVar[type[BaseModel]]       # method-specific options, extra="forbid"

    def calib_dtype(self, job: Any) -> str:
        """The dtype (torch name) blocks compute in while calibrated, for this job."""

    @classmethod
    def block_memory(cls, geometry: Any, settings: Any) -> Any:
        """`quantkit.plan.BlockWork`: its own memory while one block is calibrated."""

    def plan_settings(self, job: Any) -> dict[str, Any]:
        """`quantkit.plan.Settings` fields its options move for this job (e.g. an end-to-end stage's windows)."""

    def quantize(self, job: Any) -> Any: ...


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: Any
    description: str


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    needs_calibration: bool
    formats: tuple[str, ...]
    uses_scheme: bool = True
    options: tuple[OptionInfo, ...] = field(default_factory=tuple)


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


def method_class(name: str) -> type[Method]:
    """The class registered as `name` (its declarations), without making an instance."""
    targets = _targets()
    if name not in targets:
        raise UnknownNameError(f"unknown method {name!r}; choose one of: {', '.join(sorted(targets))}")
    return _load(targets[name])


def get_method(name: str) -> Method:
    return method_class(name)()


def _type_name(annotation: Any) -> str:
    """int, float, bool, a | b for a Literal's values or a union's members."""
    if isinstance(annotation, type):
        return annotation.__name__
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(a) for a in args)
    if args:
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    return str(annotation).replace("typing.", "")


def option_infos(options: type[BaseModel]) -> tuple[OptionInfo, ...]:
    """Each field of an Options model: name, type, default (JSON-ready) and description."""
    out = []
    for name, f in options.model_fields.items():
        default = None if f.default is PydanticUndefined else f.default
        if default is not None and not isinstance(default, (bool, int, float, str)):
            default = str(default)
        out.append(OptionInfo(name, _type_name(f.annotation), default, f.description or ""))
    return tuple(out)


def method_info(name: str) -> MethodInfo:
    cls = method_class(name)
    return MethodInfo(name, cls.description, cls.needs_calibration, tuple(cls.formats),
                      getattr(cls, "uses_scheme", True), option_infos(cls.Options))


def list_methods() -> list[MethodInfo]:
    return [method_info(name) for name in method_names()]
