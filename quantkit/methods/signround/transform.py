"""Learned equivalent scales (OmniQuant's learnable equivalent transformation, in its weight-only form), tuned
beside the rounding: one per-channel scale s per architecture mapping (previous op -> the Linears it feeds,
the same data AWQ's scales fold through).

    the Linears' input columns are multiplied by s before they are quantized: the grid sees W * s;
    the previous op's output is divided by s: a norm's weight becomes (offset + w) / s - offset,
    a previous Linear's output rows (and bias) are divided by s before that Linear is quantized.

The product is exact in real arithmetic, so the block computes what it computed before the scales, up to the
rounding, which now happens on a grid the scales chose. After tuning, the scales are folded for good: the
norms and biases hold their divided values, the codes are those of the scaled weights, and the checkpoint is a
plain one with no transform left to run. s = exp(t), t starts at 0 (no scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantkit.models.arch import AWQMapping


@dataclass(frozen=True)
class Scales:
    """One mapping's tuned log-scale t (C,): s = exp(t)."""

    prev: str
    linears: tuple[str, ...]
    prev_is_linear: bool
    norm_offset: float
    log_s: Tensor


def start_scales(block: nn.Module, mappings: list[AWQMapping], quantized: set[str]) -> list[Scales]:
    """A zero log-scale per usable mapping whose Linears (and previous Linear, if any) are all being tuned.

    A previous Linear that is not being tuned here could not take the division into its float weight
    without a second rounding, so its mapping is skipped.
    """
    out = []
    for m in mappings:
        prev = block.get_submodule(m.prev)
        is_lin = isinstance(prev, nn.Linear)
        if is_lin and m.prev not in quantized:
            continue
        if not set(m.linears) <= quantized:
            continue
        width = block.get_submodule(m.linears[0]).in_features
        out.append(Scales(m.prev, tuple(m.linears), is_lin, m.norm_offset,
                          torch.zeros(width, device=prev.weight.device, requires_grad=True)))
    return out


def scaled(block: nn.Module, masters: dict[str, Tensor], scales: list[Scales]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the masters as the grid sees them, the previous ops' divided float tensors by parameter name)."""
    eff = dict(masters)
    extra: dict[str, Tensor] = {}
    for sc in scales:
        s = sc.log_s.exp()
        for n in sc.linears:
            eff[n] = eff[n] * s[None, :]
        prev = block.get_submodule(sc.prev)
        if sc.prev_is_linear:
            eff[sc.prev] = eff[sc.prev] / s[:, None]
        else:
            extra[f"{sc.prev}.weight"] = (prev.weight + sc.norm_offset) / s - sc.norm_offset
        bias = getattr(prev, "bias", None)
        if isinstance(bias, Tensor):
            extra[f"{sc.prev}.bias"] = bias / s
    return eff, extra


@torch.no_grad()
def fold_scales(block: nn.Module, scales: list[Scales]) -> None:
    """Divide the previous ops' float tensors by the tuned s for good (the Linears' side is in their codes)."""
    for sc in scales:
        s = sc.log_s.detach().exp()
        prev = block.get_submodule(sc.prev)
        if not sc.prev_is_linear:
            prev.weight.data = ((prev.weight.data.float() + sc.norm_offset) / s - sc.norm_offset).to(prev.weight.dtype)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, Tensor):
            bias.data = (bias.data.float() / s).to(bias.dtype)
