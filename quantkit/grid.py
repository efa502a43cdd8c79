"""Integer-grid maths shared by every method: fit (scale, zero), quantize, dequantize.

Shapes: a weight is (out, in); groups run along `in`. Scales and zeros are
(out, n_groups). Codes are integers in [0, 2**bits). Dequantization is
    w[o, i] = scale[o, g_idx[i]] * (code[o, i] - zero[o, g_idx[i]]).
Scales are rounded to fp16 as soon as they are fitted, because every checkpoint
format stores them in fp16: the codes are chosen against the stored scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MIN_SCALE = 1e-6  # stays a (subnormal) non-zero fp16 value


def fit_grid(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Min/max grid for each row of `w` (..., n): returns scale, zero of shape (..., 1), float32.

    The range always contains 0 (as GPTQ does), so the zero point is on the grid.
    Asymmetric zeros are kept >= 1: the GPTQ v1 format stores zero-1 and cannot hold -1.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    xmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        scale = (2 * xmax / maxq).clamp(min=_MIN_SCALE).half().float()
        zero = torch.full_like(scale, (maxq + 1) // 2)
        return scale, zero
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE).half().float()
    zero = torch.round(-xmin / scale)
    # zero == 0 means no negative weight: move it to 1 and widen the step to keep xmax reachable.
    low = zero < 1
    if low.any():
        scale = torch.where(low, (xmax / (maxq - 1)).clamp(min=_MIN_SCALE).half().float(), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero.clamp(max=maxq)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Nearest codes in [0, 2**bits) (float tensor of integers, same shape as w)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Quantize then dequantize (the weight the checkpoint will hold)."""
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


@dataclass
class QuantizedWeight:
    """One quantized Linear, independent of any checkpoint format.

    codes:  (out, in)        uint8 integers in [0, 2**bits)
    scales: (out, n_groups)  float32, exactly representable in fp16
    zeros:  (out, n_groups)  uint8 integer zero points
    g_idx:  (in,)            int32 group of each input column
    bias:   (out,) or None
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    sym: bool
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        out_f, in_f = self.codes.shape
        n_groups = self.scales.shape[1]
        assert self.scales.shape == (out_f, n_groups), self.scales.shape
        assert self.zeros.shape == (out_f, n_groups), self.zeros.shape
        assert self.g_idx.shape == (in_f,), self.g_idx.shape
        assert self.bias is None or self.bias.shape == (out_f,)

    def cpu(self) -> QuantizedWeight:
        """The same weight with every tensor on the CPU (what a method's results hold)."""
        return QuantizedWeight(codes=self.codes.cpu(), scales=self.scales.cpu(), zeros=self.zeros.cpu(),
                               g_idx=self.g_idx.cpu(), bits=self.bits, group_size=self.group_size, sym=self.sym,
                               bias=None if self.bias is None else self.bias.cpu())

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with every tensor on `device`."""
        return QuantizedWeight(codes=self.codes.to(device), scales=self.scales.to(device), zeros=self.zeros.to(device),
                               g_idx=self.g_idx.to(device), bits=self.bits, group_size=self.group_size, sym=self.sym,
                               bias=None if self.bias is None else self.bias.to(device))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def trivial_g_idx(self) -> bool:
        in_f = self.codes.shape[1]
        gs = in_f if self.group_size == -1 else self.group_size
        return bool(torch.equal(self.g_idx, torch.arange(in_f, dtype=torch.int32, device=self.g_idx.device) // gs))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(out, in) s * (q - z) in `dtype`, each column with its group's scale and zero (g_idx)."""
        out_f, in_f = self.codes.shape
        n_groups = self.scales.shape[1]
        if self.trivial_g_idx:
            # contiguous groups: broadcast (out, G, 1) over (out, G, gs) instead of gathering (out, in) grids;
            # the same two float operations per element, so the same bits (measured 28 -> 1 s on a 1B model)
            w = self.codes.reshape(out_f, n_groups, in_f // n_groups).to(self.scales.dtype)
            w.sub_(self.zeros.to(self.scales.dtype)[..., None]).mul_(self.scales[..., None])
            return w.reshape(out_f, in_f).to(dtype)
        g = self.g_idx.long()
        s = self.scales[:, g]
        z = self.zeros[:, g].to(s.dtype)
        return (s * (self.codes.to(s.dtype) - z)).to(dtype)


def trivial_g_idx(in_features: int, group_size: int) -> Tensor:
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // gs


def rtn_quantize(weight: Tensor, bits: int, group_size: int, sym: bool, bias: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest with a min/max grid per group: (out, in) -> QuantizedWeight."""
    out_f, in_f = weight.shape
    gs = in_f if group_size == -1 else group_size
    w = weight.detach().float().reshape(out_f, in_f // gs, gs)  # (out, n_groups, gs)
    scale, zero = fit_grid(w, bits, sym)  # (out, n_groups, 1)
    codes = quantize_codes(w, scale, zero, bits).reshape(out_f, in_f)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scale.squeeze(-1),
        zeros=zero.squeeze(-1).to(torch.uint8),
        g_idx=trivial_g_idx(in_f, group_size),
        bits=bits,
        group_size=group_size,
        sym=sym,
        bias=None if bias is None else bias.detach().float().clone(),
    )
