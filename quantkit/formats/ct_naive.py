"""compressed-tensors `int-quantized` and `float-quantized` (llm-compressor's W8A8, FP8 and FP8_DYNAMIC): 8-bit
weights stored unpacked, one Linear at a time.

Tensors of one quantized Linear (out, in):
    weight:        (out, in)  int8 q in [-128, 127] (int) or float8_e4m3fn (float)
    weight_scale:  (out, 1) per channel, (1,) per tensor; the model's float dtype (fp16 here)
    input_scale:   (1,) static activation scale (w8a8-static, fp8); absent for dynamic (per-token) activations
Symmetric grids store no zero points (compressed-tensors removes them on compression), and dequantize
w = weight_scale * weight. quantkit's unsigned int8 code is q + 128 (zero 128), the GPTQ convention.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from quantkit.grid import FP8_DTYPE, QuantizedWeight, trivial_g_idx


class CTNaiveLayout:
    """QuantizedWeight <-> compressed-tensors int-quantized / float-quantized tensors of one Linear."""

    name: ClassVar[str] = "compressed-tensors"
    marker: ClassVar[str] = "weight_scale"  # only a quantized Linear has one (its `weight` name is a float Linear's too)

    def __init__(self, number: str = "int", per_tensor: bool = False, static_input: bool = False):
        self.number, self.per_tensor, self.static_input = number, per_tensor, static_input

    def shapes(self, out_f: int, in_f: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "weight": ((out_f, in_f), FP8_DTYPE if self.number == "float" else torch.int8),
            "weight_scale": ((1,) if self.per_tensor else (out_f, 1), torch.float16),
        }
        if self.static_input:
            out["input_scale"] = ((1,), torch.float16)
        return out

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        if qw.bits != 8 or qw.group_size != -1 or not qw.sym:
            raise ValueError("int-/float-quantized layers are 8-bit, symmetric, per channel or per tensor")
        if qw.is_float != (self.number == "float"):
            raise ValueError(f"a {'float' if qw.is_float else 'int'} weight given to the {self.number} layout")
        if self.number == "float":
            weight = qw.codes.contiguous()
        else:
            if not bool((qw.zeros == 128).all()):
                raise ValueError("a symmetric int8 grid needs every zero point at 128")
            weight = (qw.codes.to(torch.uint8) ^ 0x80).view(torch.int8).contiguous()
        scale = qw.scales.to(torch.float16)
        if self.per_tensor:
            if not bool((scale == scale[0, 0]).all()):
                raise ValueError("a per-tensor layer needs one scale for every row")
            scale = scale[:1, 0].clone()
        t = {"weight": weight, "weight_scale": scale.contiguous()}
        if self.static_input:
            if qw.input_scale is None:
                raise ValueError("a static activation scheme needs each Linear's calibrated input_scale")
            t["input_scale"] = qw.input_scale.reshape(1).to(torch.float16).contiguous()
        return t

    def unpack(self, t: dict[str, Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
        w = t["weight"]
        out_f, in_f = w.shape
        if self.number == "float":
            codes, zero = w.to(FP8_DTYPE), 0
        else:
            codes, zero = w.view(torch.uint8) ^ 0x80, 128
        scales = t["weight_scale"].float().reshape(-1, 1).expand(out_f, 1).contiguous()
        inp = t.get("input_scale")
        return QuantizedWeight(codes=codes.contiguous(), scales=scales,
                               zeros=torch.full((out_f, 1), zero, dtype=torch.uint8, device=w.device),
                               g_idx=trivial_g_idx(in_f, -1).to(w.device), bits=8, group_size=-1, sym=True,
                               input_scale=None if inp is None else inp.float().reshape(1))
