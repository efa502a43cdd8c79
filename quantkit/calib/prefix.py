"""A decoder block's other inputs (rotary tables, position ids, masks) for windows of another shape than the ones
they were captured with: the first positions of each window (`prefix_inputs`), or another number of windows a
batch (`batch_inputs`).

A causal block's outputs at positions 0..n-1 depend only on its inputs at those positions, so a window cut to its
first n tokens gives exactly the outputs the whole window gives there. Tuning on such prefixes costs n/T of the
matmuls and (n/T)^2 of the attention. The block's other inputs (rotary tables, position ids, masks) are cut with
it: every tensor dimension of the window's length is sliced, except a batch dimension. `prefix_inputs` checks the
result on one window (outputs of the cut inputs against the first n outputs of the whole window), so a block that
is not causal, or an input whose layout the rule misreads, is tuned on whole windows instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calib.pipeline import _first
from quantkit.compute import iter_tensors, map_tensors

log = logging.getLogger(__name__)

# relative RMS difference allowed (the attention's reduction order changes with the length)
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


def _cut(seqlen: int, n: int) -> Callable[[Tensor], Tensor]:
    def cut(x: Tensor) -> Tensor:
        for dim in range(x.ndim):
            if x.shape[dim] == seqlen and (dim > 0 or x.ndim == 1):
                x = x.narrow(dim, 0, n)
        return x
    return cut


def _mask_batch(x: Any) -> int:
    """The batch an attention mask among the inputs was built for (masks are (batch, 1, T, T)), else 1."""
    return max((t.shape[0] for t in iter_tensors(x) if t.ndim == 4), default=1)


def _one_mask(b: int) -> Callable[[Tensor], Tensor]:
    def one(x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[0] in (1, b):
            return x
        if not bool((x == x[:1]).all()):
            raise ValueError(f"the block's attention masks differ between the {x.shape[0]} windows of a batch")
        return x[:1]
    return one


def batch_inputs(args: tuple, kwargs: dict[str, Any], b: int) -> tuple[tuple, dict[str, Any]]:
    """The block's other inputs for batches of `b` windows: an attention mask (batch, 1, T, T) captured for another
    batch size becomes one mask that broadcasts (calibration windows are unpadded, so every window's mask is the
    same; masks that differ raise ValueError)."""
    return map_tensors(args, _one_mask(b)), map_tensors(kwargs, _one_mask(b))


def cut_inputs(args: tuple, kwargs: dict[str, Any], seqlen: int, n: int) -> tuple[tuple, dict[str, Any]]:
    """The block's other inputs for windows of `n` tokens instead of `seqlen`."""
    return map_tensors(args, _cut(seqlen, n)), map_tensors(kwargs, _cut(seqlen, n))


@torch.no_grad()
def prefix_inputs(block: nn.Module, x: Tensor, args: tuple, kwargs: dict[str, Any],
                  n: int) -> tuple[tuple, dict[str, Any]] | None:
    """(args, kwargs) for the first `n` positions of windows like `x` (B, T, hidden), or None where the cut does not
    reproduce the block's outputs there (checked on the first window, in the block's dtype)."""
    seqlen = x.shape[1]
    if n <= 0 or n >= seqlen:
        return None
    c_args, c_kwargs = cut_inputs(args, kwargs, seqlen, n)
    dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), x.dtype)
    probe = x[:_mask_batch(kwargs)].to(dtype)
    try:
        with torch.autocast(x.device.type, enabled=False):
            full = _first(block(probe, *args, **kwargs))[:, :n].float()
            part = _first(block(probe[:, :n].contiguous(), *c_args, **c_kwargs)).float()
    except (RuntimeError, ValueError, IndexError) as e:
        log.warning("window prefix of %d tokens: the block does not run on it (%s); tuning on whole windows", n, e)
        return None
    if part.shape != full.shape:
        return None
    rel = float((part - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt().clamp(min=1e-12))
    if rel > _TOLERANCE.get(dtype, 1e-2):
        log.warning("window prefix of %d tokens: outputs differ from the whole window's by %.2g (not a causal "
                    "block?); tuning on whole windows", n, rel)
        return None
    return c_args, c_kwargs
