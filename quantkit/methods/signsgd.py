"""Signed-gradient steps (AutoRound's optimizer), shared by SignRound's block stage and the end-to-end stage."""

from __future__ import annotations

import torch
from torch import Tensor


def ste_half(x: Tensor) -> Tensor:
    """`x` rounded to float16 in the forward pass, the identity in the backward pass (scales are stored in fp16)."""
    return x + (x.half().float() - x).detach()


@torch.no_grad()
def sign_step_(params: list[Tensor], lr: float, momenta: dict[int, Tensor] | None = None, beta: float = 0.0) -> None:
    """Signed gradient descent: p -= lr * sign(grad); gradients are cleared. With `beta` > 0 (Signum), the sign is
    taken of a running mean m = beta * m + (1 - beta) * grad, kept in `momenta` by parameter id."""
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        if beta > 0 and momenta is not None:
            m = momenta.get(id(p))
            g = momenta[id(p)] = g.clone() if m is None else m.mul_(beta).add_(g, alpha=1 - beta)
        p.sub_(torch.sign(g), alpha=lr)
        p.grad = None


def linear_decay(lr: float, step: int, total: int) -> float:
    """AutoRound's schedule: from lr down to 0 over `total` steps."""
    return lr * (1.0 - step / max(total, 1))
