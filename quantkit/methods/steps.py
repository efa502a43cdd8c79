"""Block steps: the registered pieces a method is composed of.

A step turns one block (`BlockCalib`) and the names of its Linears to quantize into results, and
declares what it reads from the job's options (`Options`) and its memory (`memory`). A step that
`rounds` writes the block's quantized weights (and leaves the block computing with them); the
others change the float block in place (AWQ's scales, folded exactly into the previous op).
Steps are registered here once, by import string, and composed by name (`quantkit.methods.composed`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from quantkit.errors import UnknownNameError
from quantkit.methods.base import QuantJob
from quantkit.methods.blockwise import BlockStep
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage
from quantkit.plan import BlockWork, Geometry, Settings

STEPS: dict[str, str] = {
    "awq-scales": "quantkit.methods.awq.steps:SCALES",
    "gptq-rounding": "quantkit.methods.gptq.steps:ROUNDING",
    "smooth": "quantkit.methods.smoothquant.steps:SMOOTH",
    "rtn-rounding": "quantkit.methods.rtn.steps:ROUNDING",
}


def _no_record(options: BaseModel) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Step:
    name: str
    Options: type[BaseModel]                                            # the option fields it reads
    make: Callable[[QuantJob, ArchSpec, ExpertCoverage], BlockStep]     # the step for one job
    memory: Callable[[Geometry, Settings], BlockWork]                   # its own memory in a block
    rounds: bool                                                        # writes the quantized weights
    record: Callable[[BaseModel], dict[str, Any]] = field(default=_no_record)  # extra option record


def get_step(name: str) -> Step:
    if name not in STEPS:
        raise UnknownNameError(f"unknown step {name!r}; choose one of: {', '.join(sorted(STEPS))}")
    module, _, attr = STEPS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def option_subset(name: str, model: type[BaseModel], fields: tuple[str, ...]) -> type[BaseModel]:
    """A frozen, extra-forbidding options model with `fields` of `model` (same types, defaults, descriptions)."""
    return merged_options(name, [(model, fields)])


def merged_options(name: str, parts: list[tuple[type[BaseModel], tuple[str, ...]]]) -> type[BaseModel]:
    """One options model holding the given fields of each model, in order (a field met twice must agree)."""
    fields: dict[str, Any] = {}
    for model, names in parts:
        for n in names:
            info = model.model_fields[n]
            if n in fields and fields[n][1] != info:
                raise ValueError(f"option {n!r} differs between the steps of {name}")
            fields[n] = (info.annotation, info)
    return create_model(name, __config__=ConfigDict(extra="forbid", frozen=True), **fields)


def compose_memory(works: list[BlockWork]) -> BlockWork:
    """Steps run one after the other inside a block: the block holds the largest of each."""
    return BlockWork(work=max(w.work for w in works), forward=max(w.forward for w in works),
                     kept=max(w.kept for w in works), detail=" / ".join(w.detail for w in works if w.detail))
