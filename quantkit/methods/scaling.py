"""Per-channel scales folded exactly into the op before a group of Linears: what AWQ's scales and SmoothQuant's
smoothing both are ("scales, then rounding"). The architecture's mappings (`quantkit.models.arch`, previous op ->
the Linears it feeds) say where a scale can fold.

A scale is folded exactly: the previous op's output is divided by s (norm weight and bias, or the
previous Linear's output rows) and the Linears' input columns are multiplied by s.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from quantkit.models.arch import ArchSpec, AWQMapping, block_mappings

log = logging.getLogger(__name__)


def fold_scale(block: nn.Module, prev_name: str, linear_names: tuple[str, ...], s: Tensor,
               norm_offset: float = 0.0, compensate: tuple[str, ...] = ()) -> None:
    """Divide the previous op's output by s (C,) and multiply the Linears' input columns by s.

    Exact in real arithmetic: a norm computes x_hat * (offset + w) + b, so (offset + w)/s - offset
    and b/s give its output / s; a previous Linear's output rows (and bias) are divided by s.
    `compensate`: full-precision modules also fed by prev (MoE routers): their weight columns
    are multiplied by s too, so their outputs (the routing) do not change.
    """
    prev = block.get_submodule(prev_name)
    if isinstance(prev, nn.Linear):
        prev.weight.data = prev.weight.data / s.to(prev.weight.dtype)[:, None]
    else:
        prev.weight.data = (prev.weight.data + norm_offset) / s.to(prev.weight.dtype) - norm_offset
    bias = getattr(prev, "bias", None)
    if isinstance(bias, Tensor):
        bias.data = bias.data / s.to(bias.dtype)
    for name in (*linear_names, *compensate):
        lin = block.get_submodule(name)
        lin.weight.data = lin.weight.data * s.to(lin.weight.dtype)[None, :]


def usable_mappings(block: nn.Module, spec: ArchSpec, targets: set[str]) -> list[AWQMapping]:
    """The spec's mappings that apply to this block (names relative to it), in spec order.

    A mapping is skipped when a module is missing, when one of its Linears is not quantized,
    or when widths disagree: e.g. v_proj -> o_proj under GQA, where v_proj's output is narrower
    than o_proj's input (num_kv_heads * head_dim != hidden) and no per-channel scale can fold.
    """
    out = []
    for m in block_mappings(block, spec):
        try:
            prev = block.get_submodule(m.prev)
            lins = [block.get_submodule(n) for n in m.linears]
            block.get_submodule(m.inspect)
            comp = [block.get_submodule(n) for n in m.compensate]
            if m.input:
                block.get_submodule(m.input)
        except AttributeError:
            continue
        if not lins or any(n not in targets for n in m.linears) or not all(isinstance(lin, nn.Linear) for lin in lins):
            continue
        width = lins[0].in_features
        if any(lin.in_features != width for lin in lins):
            continue
        if any(not isinstance(getattr(c, "weight", None), Tensor) or c.weight.shape[-1] != width for c in comp):
            continue
        if isinstance(prev, nn.Linear):
            if prev.out_features != width:
                log.debug("scales: skipping %s -> %s (widths %d != %d)", m.prev, m.linears, prev.out_features, width)
                continue
        elif not isinstance(getattr(prev, "weight", None), Tensor) or tuple(prev.weight.shape) != (width,):
            continue
        out.append(m)
    return out
