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

    The range always contains 0 (as GPTQ does), so the zero point is on the grid. Symmetric grids below 8 bits
    give the scale the sign of the group's extreme (see below), so their scales may be negative.
    Asymmetric zeros are kept >= 1: the GPTQ v1 format stores zero-1 and cannot hold -1.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    xmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        half = (maxq + 1) // 2
        mag = torch.maximum(-xmin, xmax)
        zero = torch.full_like(mag, half)
        if bits >= 8:  # 127 or 128 steps: a gain of 1/255, not worth a negative scale in the int8 GEMM paths
            return (2 * mag / maxq).clamp(min=_MIN_SCALE).half().float(), zero
        # The extreme keeps its sign and lands on the lowest code, -2^(b-1) steps: all 2^b levels are used and
        # the extreme is never clipped (llama.cpp's Q4_0, d = max / -8). The scale is negative where it is positive.
        scale = (mag / half).clamp(min=_MIN_SCALE).half().float()
        return torch.where(xmax > -xmin, -scale, scale), zero
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
    input_scale: (1,) float32 calibrated scale of the Linear's input activations (static activation schemes)

    FP8 weights: codes are float8_e4m3fn values and zeros are 0 (`quantize_weight`).
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    sym: bool
    bias: Tensor | None = None
    input_scale: Tensor | None = None

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
                               bias=None if self.bias is None else self.bias.cpu(),
                               input_scale=None if self.input_scale is None else self.input_scale.cpu())

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with every tensor on `device`."""
        return QuantizedWeight(codes=self.codes.to(device), scales=self.scales.to(device), zeros=self.zeros.to(device),
                               g_idx=self.g_idx.to(device), bits=self.bits, group_size=self.group_size, sym=self.sym,
                               bias=None if self.bias is None else self.bias.to(device),
                               input_scale=None if self.input_scale is None else self.input_scale.to(device))

    @property
    def is_float(self) -> bool:
        """FP8 values rather than integer codes."""
        return self.codes.dtype == FP8_DTYPE

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


# ---------------------------------------------------------------- FP8 (e4m3) and per-tensor grids

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn


FP8_SEARCH_STEPS = 32  # candidate scales of the "mse" observer: max|w| / 448 times 1 + k / 32, k = 0..31


def fit_fp8(w: Tensor, per_tensor: bool = False, observer: str = "minmax") -> Tensor:
    """FP8 scale of each row of `w` (out, in), or one for the whole weight, as (out, 1) float32.

    minmax: max|w| / 448 (compressed-tensors' and llm-compressor's). mse: per row, the scale among
    max|w| / 448 * (1 + k / 32), k = 0..31 whose FP8 values have the least squared error against the row.
    e4m3's relative grid repeats at every factor of 2, so these candidates place the row on every position
    of the mantissa grid, and none clips (max|w| / scale <= 448). Data-free.
    Every candidate is rounded to fp16 like every stored scale before its codes are computed, so the error
    is the stored checkpoint's."""
    amax = w.detach().float().abs()
    amax = amax.amax().expand(w.shape[0], 1) if per_tensor else amax.amax(dim=-1, keepdim=True)
    base = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    if observer == "minmax":
        return base.half().float().contiguous()
    if observer != "mse":
        raise ValueError(f"unknown FP8 weight observer {observer!r}: minmax or mse")
    return _fp8_mse_scale(w.detach().float(), base, per_tensor)


def _fp8_mse_scale(w: Tensor, base: Tensor, per_tensor: bool) -> Tensor:
    """The least-squared-error scale (see `fit_fp8`), searched row by row (or over the whole weight)."""
    best = base.half().float()
    best_err = _fp8_sq_err(w, best, per_tensor)
    for k in range(1, FP8_SEARCH_STEPS):
        # fp16 rounding can push max|w| / s a hair above 448 (clamped there): nearest, not clipped, in effect
        s = (base * (1 + k / FP8_SEARCH_STEPS)).half().float()
        err = _fp8_sq_err(w, s, per_tensor)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best.contiguous()


def _fp8_sq_err(w: Tensor, scale: Tensor, per_tensor: bool) -> Tensor:
    """Squared error of w's FP8 values on `scale` (out, 1): per row (out, 1), or the total broadcast to (out, 1)."""
    err = (fp8_values(w, scale) * scale - w).square_().sum(dim=-1, keepdim=True)
    return err.sum().expand_as(err) if per_tensor else err


def fp8_values(w: Tensor, scale: Tensor) -> Tensor:
    """The FP8 values w / scale rounds to (clamped to +-448), as float32 (exactly representable in e4m3)."""
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()


def per_tensor_int_grid(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """One (scale, zero) for the whole weight (out, in), broadcast to (out, 1) each."""
    scale, zero = fit_grid(w.float().reshape(1, -1), bits, sym)
    return scale.expand(w.shape[0], 1).contiguous(), zero.expand(w.shape[0], 1).contiguous()


def weight_grid(w: Tensor, bits: int, sym: bool, number: str = "int", per_tensor: bool = False,
                observer: str = "minmax") -> tuple[Tensor, Tensor]:
    """(scale, zero) of a per-channel or per-tensor grid for w (out, in), each (out, 1); float grids have zero 0
    and their scale from `observer` (`fit_fp8`)."""
    if number == "float":
        return fit_fp8(w, per_tensor, observer), torch.zeros(w.shape[0], 1, device=w.device)
    if per_tensor:
        return per_tensor_int_grid(w, bits, sym)
    return fit_grid(w, bits, sym)


def quantize_weight(weight: Tensor, bits: int, group_size: int, sym: bool, number: str = "int",
                    per_tensor: bool = False, bias: Tensor | None = None, observer: str = "minmax") -> QuantizedWeight:
    """Round-to-nearest on any grid quantkit writes: integer groups / channels / tensor, or FP8 e4m3 (its scales
    chosen by `observer`, see `fit_fp8`).

    FP8 weights keep their values as `codes` of dtype float8_e4m3fn with zeros 0, so
    `QuantizedWeight.dequantize` computes scale * value for them unchanged."""
    if number == "int" and not per_tensor:
        return rtn_quantize(weight, bits, group_size, sym, bias)
    if group_size != -1:
        raise ValueError("FP8 and per-tensor weights have no groups (group_size -1)")
    w = weight.detach().float()
    scale, zero = weight_grid(w, bits, sym, number, per_tensor, observer)
    if number == "float":
        codes = fp8_values(w, scale).to(FP8_DTYPE)
    else:
        codes = quantize_codes(w, scale, zero, bits).to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scale, zeros=zero.to(torch.uint8), g_idx=trivial_g_idx(w.shape[1], -1),
                           bits=bits, group_size=-1, sym=sym,
                           bias=None if bias is None else bias.detach().float().clone())


# ---------------------------------------------------------------- activations


def activation_scale(x: Tensor, number: str) -> Tensor:
    """Per-token (last-dim) symmetric scale of activations x, in x's dtype: max|x| / 127.5 (int8) or / 448 (FP8),
    a zero scale replaced by the dtype's eps, as compressed-tensors computes dynamic token scales."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / (FP8_MAX if number == "float" else 127.5)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale.dtype).eps), scale)


def quantize_activations(x: Tensor, number: str, scale: Tensor | None = None) -> Tensor:
    """Fake-quantized activations (quantize, then dequantize in x's dtype): the values a W8A8 / FP8 kernel
    multiplies. `scale` None: dynamic per token; else the static (calibrated) scale."""
    if scale is None:
        scale = activation_scale(x, number)
    else:
        scale = scale.to(device=x.device, dtype=x.dtype)
    y = x / scale
    if number == "float":
        q = y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(x.dtype)
    else:
        q = torch.round(y).clamp(-128, 127)
    return q * scale


def int8_activations(x: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(int8 codes (M, K), float32 scale (M, 1)) of 2-D activations, per token unless `scale` (static) is given:
    the same codes `quantize_activations(x, "int", scale)` multiplies."""
    s = activation_scale(x, "int") if scale is None else scale.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 1)
    q = torch.round(x / s).clamp_(-128, 127).to(torch.int8)
    return q, s.float()
