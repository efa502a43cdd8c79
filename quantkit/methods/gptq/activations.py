"""llama.cpp's 8-bit activations, and GPTQ statistics for them (`--opt activations=q8`, GGUF only).

ggml's CPU matmul converts a quantized weight's input activations to the weight type's `vec_dot_type` before the
dot product (ggml-cpu.c's type traits): Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0/IQ4_NL weights, Q8_1 for Q4_1/Q5_1,
Q8_K blocks of 256 for the K-types and IQ4_XS. The dot product then equals the weight's decoded values times the
activations' decoded values; the functions here return those decoded activations (float32, same shape):

- Q8_0 and Q8_1 (ggml-cpu/arch/x86/quants.c, the AVX/AVX2 path an x86 build runs): per block of 32,
  amax = max|x|, d = amax / 127 stored as f16, codes = round-half-to-even(x * (127 / amax)) (0 for an all-zero block),
  values codes * f16(d). Q8_1 also stores f16(d * Σcodes), which Q4_1/Q5_1 multiply by their min: that term is
  rounded to f16 as a whole and is not an element-wise value, so it is left out (Q8_1's values are Q8_0's).
  `ref=True`: ggml's scalar reference (quantize_row_q8_0_ref, also gguf-py's): codes = roundf(x * (1 / d)), ties
  away from zero.
- Q8_K (ggml-quants.c quantize_row_q8_K_ref, which the x86 build also runs): per block of 256, `max` = the first
  value of largest |x| with its sign, iscale = -127 / max, codes = min(127, nearest_int(iscale * x)) (round half to
  even), d = 1 / iscale in float32 (no f16), values codes * d.

With the option, each Linear is rounded for those activations: with X its float inputs and X_q their quantization
by its weight type's vec_dot_type, the target is the least-squares weight for them, W* = W (C + δI)(H_q + δI)⁻¹
(C = 2XᵀX_q / n, H_q = 2X_qᵀX_q / n, δ = damp x mean(diag H_q)), and GPTQ rounds W* with H_q. ‖XWᵀ - X_qŴᵀ‖², the
error the file shows in llama.cpp, is then what each Linear's rounding minimizes. That is best per Linear, not end
to end: with the full target the model's weight error grows by more than its activation error shrinks
(benchmarks/results/gguf.md, session 15), so the option's target goes part way, W + alpha (W* - W), alpha 0.5 by
default. Variants: W itself rounded with H_q
(`q8_hessian`); the target rounded with the float Hessian (`q8_target`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from quantkit.methods.gptq.algorithm import HessianAccumulator

Q8_0_WEIGHTS = frozenset({"Q8_0", "Q4_0", "Q5_0", "IQ4_NL"})
Q8_1_WEIGHTS = frozenset({"Q4_1", "Q5_1"})
Q8_K_WEIGHTS = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})


def vec_dot_type(weight_type: str) -> str | None:
    """The activation type ggml's CPU matmul gives a weight of `weight_type` (a GGML type name), None for F32/F16
    weights (float activations) or a type not listed here."""
    if weight_type in Q8_0_WEIGHTS:
        return "Q8_0"
    if weight_type in Q8_1_WEIGHTS:
        return "Q8_1"
    if weight_type in Q8_K_WEIGHTS:
        return "Q8_K"
    return None


def q8_0_activations(x: Tensor, ref: bool = False) -> Tensor:
    """x (..., k * 32) decoded after ggml's Q8_0 quantization (module docstring); `ref`: the scalar reference."""
    b = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = amax / 127
    live = amax > 0
    # number / tensor in torch is a reciprocal times the number (two roundings): divide tensors, as C does
    if ref:
        inv = torch.where(live, torch.ones_like(d) / torch.where(live, d, 1), 0)
        q = torch.trunc(b * inv + torch.copysign(torch.full_like(b, 0.5), b))
    else:
        inv = torch.where(live, torch.full_like(amax, 127) / torch.where(live, amax, 1), 0)
        q = torch.round(b * inv)                                    # _MM_ROUND_NEAREST: ties to even
    return ((q + 0.0) * d.half().float()).reshape(x.shape)         # + 0.0: an int8 code 0 has no sign


def q8_k_activations(x: Tensor) -> Tensor:
    """x (..., k * 256) decoded after ggml's Q8_K quantization (module docstring)."""
    b = x.float().reshape(*x.shape[:-1], -1, 256)
    at = b.abs().argmax(-1, keepdim=True)                           # the first of the largest |x|
    mx = b.gather(-1, at)
    live = mx != 0
    iscale = torch.where(live, torch.full_like(mx, -127) / torch.where(live, mx, 1), 0)  # tensor / tensor, as C
    q = torch.round(iscale * b).clamp(max=127) + 0.0               # nearest_int: ties to even; no signed zero
    d = torch.where(live, torch.ones_like(iscale) / torch.where(live, iscale, 1), 0)
    return (q * d).reshape(x.shape)


def quantize_activations(x: Tensor, kind: str) -> Tensor:
    """x as a weight whose vec_dot_type is `kind` ("Q8_0", "Q8_1", "Q8_K") multiplies it."""
    if kind in ("Q8_0", "Q8_1"):
        return q8_0_activations(x)
    if kind == "Q8_K":
        return q8_k_activations(x)
    raise ValueError(f"no 8-bit activation type {kind!r}")


class QuantizedInputStats:
    """Streams, per activation type, H_q = 2X_qᵀX_q / n and (with `cross`) C = 2XᵀX_q / n of a Linear group's
    inputs X, and with `float_hessian` H = 2XᵀX / n (`h_float`: GPTQ then rounds with H, the target still from
    C and H_q); `add`, `tokens` and `hessian()` as `HessianAccumulator` (hessian(): this object, finalised)."""

    def __init__(self, n_features: int, kinds: Iterable[str], device: torch.device | str, cross: bool = True,
                 float_hessian: bool = False):
        self.hq = {k: HessianAccumulator(n_features, device) for k in sorted(set(kinds))}
        self.h = HessianAccumulator(n_features, device) if float_hessian else None
        self.h_float: Tensor | None = None
        self.cross: dict[str, Tensor] | None = (
            {k: torch.zeros(n_features, n_features, dtype=torch.float32, device=device) for k in self.hq}
            if cross else None)
        self.tokens = 0
        self.absmax = None
        self.done: dict[str, Tensor] = {}

    def add(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if self.h is not None:
            self.h.add(x2)
        for k, acc in self.hq.items():
            xq = quantize_activations(x2, k)
            acc.add(xq)
            if self.cross is not None:
                self.cross[k].addmm_(x2.t(), xq)
        self.tokens += x2.shape[0]

    def hessian(self) -> QuantizedInputStats:
        if self.tokens == 0:
            raise ValueError("no calibration activations reached this Linear")
        self.done = {k: acc.hessian() for k, acc in self.hq.items()}
        self.h_float = None if self.h is None else self.h.hessian()
        if self.cross is not None:
            for c in self.cross.values():
                c.mul_(2.0 / self.tokens)
        return self

    @property
    def sum(self) -> QuantizedInputStats:
        """A group no token reached (collect_hessians' MoE path): `gptq_block` rounds it without statistics."""
        return self


def least_squares_target(w: Tensor, cross: Tensor, hq: Tensor, ridge: float) -> Tensor:
    """W (C + ridge I)(H_q + ridge I)⁻¹ in float32 (H_q symmetric): the weight that best maps X_q to XWᵀ, the ridge
    pulling it towards W itself."""
    c, hd = cross.to(torch.float32).clone(), hq.to(torch.float32).clone()
    c.diagonal().add_(ridge)
    hd.diagonal().add_(ridge)
    return torch.linalg.solve(hd, c.t() @ w.to(torch.float32).t()).t()
