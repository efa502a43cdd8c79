"""Round-to-nearest: a min/max grid per group, no calibration data."""

from __future__ import annotations

from typing import Any

from torch import nn

from quantkit.grid import QuantizedWeight, quantize_weight
from quantkit.methods.base import QuantJob, WeightOnlyMethod
from quantkit.models.arch import ArchSpec


class RTN(WeightOnlyMethod):
    name = "rtn"
    description = "round-to-nearest on a min/max grid per group; instant, no data"
    formats = ("gptq", "compressed-tensors")
    activation_schemes = True
    module_grids = True

    def quantize_model(self, model: nn.Module, tokenizer: Any, spec: ArchSpec, layers: dict[str, nn.Linear],
                       job: QuantJob) -> dict[str, QuantizedWeight]:
        s = job.scheme
        out = {}
        for i, (name, lin) in enumerate(layers.items()):
            g = s.grid_of(name)
            out[name] = quantize_weight(lin.weight, g.bits, g.group_size, s.sym, s.type, s.weight_strategy == "tensor",
                                        lin.bias, s.observer)
            if job.progress:
                job.progress("layers", i + 1, len(layers))
        return out
