"""GPTQ towards the float model's outputs (`--opt float_target=true`; GPTAQ / GPTQ v2's asymmetric calibration).

GPTQ rounds each Linear so that Ŵ X̃ stays close to W X̃, X̃ being the inputs the already-quantized model
gives it: the errors of earlier layers are carried forward, not corrected. The float model computed W X on
its own inputs X. Rounding towards that,

    min ||W X − Ŵ X̃||²  =  ||(W* − Ŵ) X̃||² + const,   W* = W Xᵀ X̃ (X̃ᵀ X̃)⁻¹   (rows of X, X̃: tokens)

is GPTQ on the target W* with the quantized inputs' Hessian H̃ = X̃ᵀ X̃: each Linear also undoes what the
quantized layers before it moved. With GPTQ's dampening δ as a ridge towards W itself,
W* = W (Xᵀ X̃ + δI)(X̃ᵀ X̃ + δI)⁻¹, which is W exactly when X̃ = X.

Pairs of X and X̃ are the same token of the same window: the float block runs on the float model's inputs
(the pipeline's reference stream) once, before any of its Linears is quantized, and each group's float
inputs are kept per batch beside the quantized pass that accumulates H̃ (`FloatTargetStats`, the pipeline's
`accumulator`). The inputs of
an MoE expert are routed tokens, which differ between the two streams, so MoE blocks are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.calib.hooks import HookSet
from quantkit.methods.gptq.activations import least_squares_target
from quantkit.methods.gptq.algorithm import HessianAccumulator


@torch.no_grad()
def float_group_inputs(block: nn.Module, firsts: Sequence[nn.Module], reference: list[Tensor], args: tuple,
                       kwargs: dict, device: torch.device, dtype: torch.dtype | None,
                       store: torch.device) -> list[list[Tensor]]:
    """For each module of `firsts` (each group's first Linear), its inputs per batch when `block` (still float)
    runs on the float model's inputs `reference` (a list of batches), kept on `store`."""
    caps: list[list[Tensor]] = [[] for _ in firsts]
    with HookSet() as hs:
        for k, mod in enumerate(firsts):
            hs.pre(mod, lambda _m, a, k=k: caps[k].append(a[0].detach().to(store)))
        for h in reference:
            block(h.to(device, dtype), *args, **kwargs)
    if any(len(c) != len(reference) for c in caps):
        raise ValueError("float_target: a group's Linear did not run once per batch (routed or skipped inputs)")
    return caps


@dataclass(frozen=True)
class Targeted:
    """A group's statistics for `float_target`: H̃ = 2 X̃ᵀX̃ / n and C = 2 X̃ᵀX / n."""

    h: Tensor
    cross: Tensor


class FloatTargetStats:
    """`collect_hessians`' accumulator for `float_target`: the Hessian of the quantized inputs X̃ (`acc`) and the
    cross term C = 2 X̃ᵀX / n, each batch paired with that batch's float inputs (`floats`, by `calib.batch`);
    `hessian()` gives both as a `Targeted`."""

    def __init__(self, calib: Any, floats: list[Tensor], acc: HessianAccumulator):
        self.calib, self.floats, self.acc = calib, floats, acc
        n = floats[0].shape[-1]
        self.cross = torch.zeros(n, n, dtype=torch.float32, device=acc.sum.device)

    @property
    def tokens(self) -> int:
        return self.acc.tokens

    @property
    def absmax(self) -> Tensor | None:
        return self.acc.absmax

    def add(self, x_q: Tensor) -> None:
        self.acc.add(x_q)
        xq = x_q.reshape(-1, x_q.shape[-1]).to(self.cross.device, torch.float32)
        xf = self.floats[self.calib.batch].reshape(-1, x_q.shape[-1]).to(self.cross.device, torch.float32)
        if xf.shape != xq.shape:
            raise ValueError(f"float_target: batch {self.calib.batch} has {xf.shape[0]} float tokens, "
                             f"{xq.shape[0]} quantized")
        self.cross.addmm_(xq.t(), xf)

    def hessian(self) -> Targeted:
        tokens = self.acc.tokens
        return Targeted(self.acc.hessian(), self.cross.mul_(2.0 / max(tokens, 1)))


def float_target(weight: Tensor, h: Tensor, cross: Tensor, damp: float) -> Tensor:
    """W* = W (Cᵀ + δI)(H̃ + δI)⁻¹ for `weight` (out, in), H̃ = `h` = 2 X̃ᵀX̃ / n, C = `cross` = 2 X̃ᵀX / n,
    δ = `damp` × mean diag H̃ (GPTQ's dampening). Columns no token reached stay as they are (GPTQ zeroes them)."""
    w = weight.detach().to(torch.float32)
    dead = h.diagonal() == 0
    ridge = damp * float(h.diagonal()[~dead].mean()) if bool((~dead).any()) else 1.0
    target = least_squares_target(w.to(h.device), cross.to(h.device).t(), h, ridge if ridge > 0 else 1e-6)
    target[:, dead] = w[:, dead].to(target.device)
    return target.to(weight.device)
