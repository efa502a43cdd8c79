"""The reference quantized Linear: pure PyTorch, any device, no optional kernels.

It stores the checkpoint's packed tensors as buffers (so `state_dict()` is the
checkpoint layout) and dequantizes to the input's dtype on every call. A layer of a
weight-and-activation scheme (`act`: W8A8, FP8) first fake-quantizes its input exactly as the
checkpoint says (dynamic per token, or with its calibrated `input_scale`), so its output is what
a W8A8 kernel computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantkit.formats.layouts import Layout
from quantkit.grid import QuantizedWeight, quantize_activations
from quantkit.scheme import ActivationScheme


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 layout: Layout, bias: bool = False, device: torch.device | str | None = None,
                 act: ActivationScheme | None = None):
        super().__init__()
        self.act = act
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.layout = layout
        for name, (shape, dtype) in layout.shapes(out_features, in_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, layout: Layout, act: ActivationScheme | None = None) -> "QuantLinear":
        out_f, in_f = qw.shape
        mod = cls(in_f, out_f, qw.bits, qw.group_size, qw.sym, layout, bias=qw.bias is not None, act=act)
        for name, t in layout.pack(qw).items():
            setattr(mod, name, t)
        if qw.bias is not None:
            mod.bias = qw.bias.to(torch.float16)
        return mod

    def buffers_dict(self) -> dict[str, Tensor]:
        names = self.layout.shapes(self.out_features, self.in_features, self.bits, self.group_size)
        return {n: getattr(self, n) for n in names}

    def quantized(self) -> QuantizedWeight:
        qw = self.layout.unpack(self.buffers_dict(), self.bits, self.group_size, self.sym)
        qw.bias = None if self.bias is None else self.bias.float()
        return qw

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(out, in) weight in `dtype`, on this module's device."""
        return self.quantized().dequantize(dtype)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input as the checkpoint's activation scheme quantizes it (unchanged for weight-only layers)."""
        if self.act is None:
            return x
        return quantize_activations(x, self.act.type, None if self.act.dynamic else self.input_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x)
        w = self.dequantize(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        act = "" if self.act is None else f", act={self.act.type}-{self.act.strategy}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, layout={self.layout.name}{act}")
