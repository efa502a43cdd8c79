"""A finished block stage's results back in memory: the work folder's packed blocks unpacked, and their float
tensors (the tuned norms) restored into the model, for a stage that runs on the whole model after the blocks."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from quantkit.formats.specs import get_format
from quantkit.grid import QuantizedWeight
from quantkit.methods.base import Loaded, QuantJob


def stored_results(loaded: Loaded, job: QuantJob, results: dict[str, Any], fmt_name: str,
                   options: dict[str, Any]) -> dict[str, QuantizedWeight]:
    """Every quantized Linear's codes (from `results`, or from the work folder's blocks when the run stored
    them there); the model's Linears get their dequantized weights and its blocks the stored float tensors."""
    quantized = {k: v for k, v in results.items() if isinstance(v, QuantizedWeight)}
    store = job.work.stored() if job.work is not None else None
    if store is not None:
        fmt = get_format(fmt_name)
        layout = fmt.read(fmt.quantization_config(job.scheme, options))[0]
        packed: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        params = dict(loaded.model.named_parameters())
        for e in store.entries():
            module, _, leaf = e.name.rpartition(".")
            if module in loaded.layers and leaf != "weight":  # the format's packed tensors (any layout) and bias
                packed[module][leaf] = e.load()
            elif e.name in params:
                with torch.no_grad():
                    params[e.name].copy_(e.load().to(params[e.name].dtype))
        s = job.scheme
        for module, t in packed.items():
            g = s.grid_of(module)  # the module's own grid where the scheme gives Linears theirs (--target-bpw)
            qw = layout.unpack(t, g.bits, g.group_size, s.sym)
            if "bias" in t:
                qw.bias = t["bias"].float()
            quantized[module] = qw
    with torch.no_grad():
        for name, qw in quantized.items():
            lin = loaded.layers[name]
            lin.weight.data.copy_(qw.dequantize(lin.weight.dtype).to(lin.weight.device))
    return quantized
