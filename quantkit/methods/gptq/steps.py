"""GPTQ's registered step: rounding a block's Linears with error feedback (`quantkit.methods.steps`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from quantkit.methods.gptq.memory import gptq_block_memory
from quantkit.methods.gptq.run import GPTQOptions, gptq_step
from quantkit.methods.steps import Step, option_subset


def _record(options: BaseModel) -> dict[str, Any]:
    return {"damp_percent": options.damp}  # the name the GPTQ format's quantization_config reads


ROUNDING = Step(
    name="gptq-rounding",
    Options=option_subset("GPTQRoundingOptions", GPTQOptions,
                          ("damp", "block_size", "true_sequential", "damp_retries", "act_group_aware", "shortcuts",
                                    "hessian_products")),
    make=gptq_step, memory=gptq_block_memory, rounds=True, record=_record)
