"""SignRound (Cheng et al. 2023): rounding offsets and clipping tuned per block by signed gradient descent.

Pure tensor functions, separate from the block pipeline.

Shapes: a weight W is (out, in); groups of `group_size` run along `in`, G = in / group_size.
For every quantized Linear three tensors are tuned against the block's output:

    v      (out, in)  rounding offset in [-1/2, 1/2]:  q = clamp(round(W / s + v) + z, 0, maxq)
    alpha  (out, G)   shrinks the group's minimum      (asymmetric grid; in [clip_min, 1])
    beta   (out, G)   shrinks the group's maximum      (both grids; in [clip_min, 1])

Asymmetric:  s = (beta * max(W, 0) - alpha * min(W, 0)) / maxq,  z = clamp(round(-alpha * min / s), 1, maxq)
Symmetric:   s = -beta * m / 2^(b-1), z = 2^(b-1), where m is the group's weight of largest magnitude, with
             its sign: m maps exactly to the lowest code (-2^(b-1)) whichever its sign, so every one of the
             2^b levels is reachable and the extreme is never clipped (llama.cpp's Q4_0 grid, d = max / -8,
             and AutoRound's). The scale is negative in groups whose extreme is positive.

`s` is rounded to fp16 (what every checkpoint stores) and `z` to an integer, both with a straight-
through gradient, so the weight being tuned is exactly the weight the checkpoint will hold: `finalize`
returns codes computed by the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantkit.grid import QuantizedWeight, trivial_g_idx
from quantkit.methods.signsgd import ste_half

_MIN_SCALE = 1e-6


def _ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


@dataclass
class Rounding:
    """The tunable state of one Linear: its float weight and the three tuned tensors."""

    weight: Tensor  # (out, in) float32 master, never modified
    v: Tensor       # (out, in)
    alpha: Tensor   # (out, G)
    beta: Tensor    # (out, G)
    bits: int
    group_size: int
    sym: bool

    @classmethod
    def start(cls, weight: Tensor, bits: int, group_size: int, sym: bool, dtype: torch.dtype = torch.float32) -> "Rounding":
        out_f, in_f = weight.shape
        gs = in_f if group_size == -1 else group_size
        g = in_f // gs
        w = weight.detach().float()
        return cls(weight=w, v=torch.zeros(out_f, in_f, dtype=dtype, device=w.device),
                   alpha=torch.ones(out_f, g, dtype=dtype, device=w.device),
                   beta=torch.ones(out_f, g, dtype=dtype, device=w.device),
                   bits=bits, group_size=gs, sym=sym)

    def params(self) -> list[Tensor]:
        return [self.v, self.alpha, self.beta] if not self.sym else [self.v, self.beta]

    def grid(self) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, zero, grouped weight): scale and zero (out, G, 1), weight (out, G, gs), differentiable."""
        out_f, in_f = self.weight.shape
        w = self.weight.view(out_f, in_f // self.group_size, self.group_size)
        maxq = (1 << self.bits) - 1
        beta = self.beta.float().unsqueeze(-1)
        if self.sym:
            hi, lo = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
            mag = ((torch.maximum(hi, -lo) * beta * 2 / (maxq + 1)).clamp(min=_MIN_SCALE))
            scale = ste_half(torch.where(hi > -lo, -mag, mag))
            zero = torch.full_like(scale, (maxq + 1) // 2)
            return scale, zero, w
        wmin = w.amin(-1, keepdim=True).clamp(max=0) * self.alpha.float().unsqueeze(-1)
        wmax = w.amax(-1, keepdim=True).clamp(min=0) * beta
        scale = ste_half(((wmax - wmin) / maxq).clamp(min=_MIN_SCALE))
        zero = torch.clamp(_ste_round(-wmin / scale), 1, maxq)
        return scale, zero, w

    def codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """(codes (out, G, gs) with a straight-through round, scale, zero)."""
        scale, zero, w = self.grid()
        maxq = (1 << self.bits) - 1
        q = torch.clamp(_ste_round(w / scale + self.v.float().view_as(w)) + zero, 0, maxq)
        return q, scale, zero

    def fake_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized (out, in) weight, differentiable in v, alpha, beta."""
        q, scale, zero = self.codes()
        return (scale * (q - zero)).reshape(self.weight.shape).to(dtype)

    def clamp_(self, clip_min: float) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            self.alpha.clamp_(clip_min, 1.0)
            self.beta.clamp_(clip_min, 1.0)

    @torch.no_grad()
    def finalize(self, bias: Tensor | None = None) -> QuantizedWeight:
        q, scale, zero = self.codes()
        out_f, in_f = self.weight.shape
        return QuantizedWeight(codes=q.reshape(out_f, in_f).to(torch.uint8), scales=scale.squeeze(-1).float(),
                               zeros=zero.squeeze(-1).to(torch.uint8), g_idx=trivial_g_idx(in_f, self.group_size),
                               bits=self.bits, group_size=-1 if self.group_size == in_f else self.group_size,
                               sym=self.sym, bias=None if bias is None else bias.detach().float().clone())

    def snapshot(self) -> tuple[Tensor, ...]:
        return tuple(t.detach().clone() for t in (self.v, self.alpha, self.beta))

    def restore(self, snap: tuple[Tensor, ...]) -> None:
        with torch.no_grad():
            for t, s in zip((self.v, self.alpha, self.beta), snap, strict=True):
                t.copy_(s)


