"""CPU kernels on torch's packed low-bit matmuls (torch 2.13, x86 AVX2/AVX512 and ARM).

Measured on the 2-core AVX2 machine (benchmarks/kernels.py): the int4 and int8
ops are fast only with bf16 activations (fp32/fp16 run a scalar path 10-40x
slower), so the int4/int8 kernels compute in bf16 whatever the model's dtype.
`_dyn_quant_matmul_4bit` is fast only with KleidiAI (ARM); elsewhere it is a
reference loop slower than the dequantizing QuantLinear, so `auto` never
picks it there.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
from torch import Tensor

from quantkit.formats.layouts import GPTQLayout
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import QuantizedWeight
from quantkit.kernels.base import KernelLinear, LayerSpec, act_order_perm, g_idx_kind, missing_ops
from quantkit.kernels.int4 import cpu_int4pack, gptq4_int4pack, int4_parts, int4_refusal, int4pack_block_rows

_aten = torch.ops.aten
_TOP_BITS = 0x80808080 - (1 << 32)  # the top bit of each byte of an int32 word, as a signed int32


def to_int8_centered(codes: Tensor) -> Tensor:
    """uint8 codes q -> int8 q - 128 in one pass: flipping the top bit of q is q - 128 in two's complement."""
    return (codes.to(torch.uint8) ^ 0x80).contiguous().view(torch.int8)


class CpuInt4(KernelLinear):
    """2/3/4-bit, any group size divisible by 32, sym or asym, act-order: `_weight_int4pack_mm_for_cpu`."""

    kernel_name: ClassVar[str] = "cpu-int4"
    priority: ClassVar[int] = 30
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    cacheable: ClassVar[bool] = True
    cached_attrs: ClassVar[tuple[str, ...]] = ("qgs",)

    @classmethod
    def unavailable(cls) -> str | None:
        return missing_ops("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")

    @classmethod
    def refusal(cls, spec: LayerSpec) -> str | None:
        return int4_refusal(spec, n_multiple=16)  # the CPU packer needs N % 16 == 0

    @classmethod
    def compute_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    @classmethod
    def from_module(cls, mod: QuantLinear, qw: QuantizedWeight, device: torch.device | str,
                    dtype: torch.dtype) -> KernelLinear:
        """GPTQ 4-bit words with contiguous groups go straight to the op's layout (no codes tensor)."""
        rows = int4pack_block_rows()
        out_f, in_f = qw.shape
        if (qw.codes.is_meta and isinstance(mod.layout, GPTQLayout) and qw.bits == 4 and rows is not None
                and out_f % rows == 0 and g_idx_kind(qw.g_idx, in_f, qw.group_size) == "trivial"):
            return cls(qw, mod.layout, device, dtype, words=mod.qweight)
        return super().from_module(mod, qw, device, dtype)

    def pack(self, qw: QuantizedWeight, device: torch.device, words: Tensor | None = None) -> None:
        parts = int4_parts(qw, device)
        self.qgs = parts.qgs
        if words is not None:  # GPTQ 4-bit (K/8, N) int32 words, contiguous groups
            packed = gptq4_int4pack(words.to(device), int4pack_block_rows())
        else:  # (N, K) codes -> (N, K/2) uint8 in the op's own order
            packed = cpu_int4pack(parts.codes)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_zeros", parts.scales_zeros.to(torch.bfloat16))
        self.register_buffer("perm", parts.perm)

    def matmul(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        y = _aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.qweight, self.qgs,
                                              self.scales_zeros)
        return y.to(x.dtype)


class _CpuInt8Base(KernelLinear):
    """What the two int8 kernels share: `_weight_int8pack_mm` on CPU, 8-bit codes only."""

    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    cacheable: ClassVar[bool] = True

    @classmethod
    def unavailable(cls) -> str | None:
        return missing_ops("_weight_int8pack_mm")

    @classmethod
    def refusal(cls, spec: LayerSpec) -> str | None:
        if spec.bits != 8:
            return f"serves 8-bit weights, the layer has {spec.bits} bits"
        return cls.grid_refusal(spec)

    @classmethod
    def grid_refusal(cls, spec: LayerSpec) -> str | None:
        return None


class CpuInt8(_CpuInt8Base):
    """8-bit per output channel, sym or asym: `_weight_int8pack_mm` (int8 weights, one scale per row).

    Codes q in [0, 256) with zero z become int8 (q - 128); the zero's share is a rank-1 term:
    x W^T = s * (x (q - 128)^T) - (sum_k x_k) * s * (z - 128), added in fp32.
    """

    kernel_name: ClassVar[str] = "cpu-int8"
    priority: ClassVar[int] = 30

    @classmethod
    def grid_refusal(cls, spec: LayerSpec) -> str | None:
        if spec.effective_group != spec.in_features:
            return f"serves one group per output channel, the layer has groups of {spec.group_size}"
        # shapes outside these multiples crash the op in torch 2.13 (seen at 7x33 in bf16)
        if spec.out_features % 16 or spec.in_features % 32:
            return (f"needs out_features % 16 == 0 and in_features % 32 == 0, "
                    f"the layer is {spec.out_features}x{spec.in_features}")
        return None

    @classmethod
    def compute_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    @classmethod
    def from_module(cls, mod: QuantLinear, qw: QuantizedWeight, device: torch.device | str,
                    dtype: torch.dtype) -> KernelLinear:
        """GPTQ 8-bit words become the int8 weight in one transpose and one in-place pass (no codes tensor)."""
        if qw.codes.is_meta and isinstance(mod.layout, GPTQLayout) and qw.bits == 8 and sys.byteorder == "little":
            return cls(qw, mod.layout, device, dtype, words=mod.qweight)
        return super().from_module(mod, qw, device, dtype)

    def pack(self, qw: QuantizedWeight, device: torch.device, words: Tensor | None = None) -> None:
        s = qw.scales[:, 0].float()                                        # (N,)
        shift = qw.zeros[:, 0].float() - 128                               # (N,)
        if words is not None:  # (K/4, N) int32: word (r, n) holds code[n, 4r + t] in its byte t (little-endian)
            w = words.to(device).t().contiguous()                          # (N, K/4): torch's blocked transpose
            if w.data_ptr() == words.data_ptr():                           # already contiguous (N or K/4 is 1):
                w = w.clone()                                              # never flip the checkpoint's own words
            w ^= _TOP_BITS                                                 # every byte's top bit: q - 128 as int8
            qweight = w.view(torch.int8)                                   # (N, K)
        else:
            qweight = to_int8_centered(qw.codes.to(device))
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", s.to(device=device, dtype=torch.bfloat16))
        self.register_buffer("zero_term", (s * shift).to(device) if bool(shift.any()) else None)

    def matmul(self, x: Tensor) -> Tensor:
        xb = x.to(torch.bfloat16).contiguous()
        y = _aten._weight_int8pack_mm(xb, self.qweight, self.scales)       # (M, N) bf16
        if self.zero_term is None:
            return y.to(x.dtype)
        xsum = xb.float().sum(dim=1, keepdim=True)                         # (M, 1)
        return (y.float() - xsum * self.zero_term).to(x.dtype)


class CpuDynQuant4(KernelLinear):
    """Symmetric 4-bit through `_dyn_quant_pack_4bit_weight` / `_dyn_quant_matmul_4bit`.

    The op quantizes activations to int8 per row on the fly (a lossier result than the weight-only
    kernels); it takes fp32 activations (bf16 only per channel), so it computes in fp32.
    """

    kernel_name: ClassVar[str] = "cpu-dyn4"
    priority: ClassVar[int] = 20
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    quantizes_activations: ClassVar[bool] = True
    cacheable: ClassVar[bool] = True
    cached_attrs: ClassVar[tuple[str, ...]] = ("block",)

    @classmethod
    def unavailable(cls) -> str | None:
        return missing_ops("_dyn_quant_pack_4bit_weight", "_dyn_quant_matmul_4bit")

    @classmethod
    def rank(cls, spec: LayerSpec) -> int:
        kleidi = getattr(torch.backends, "kleidiai", None)
        return cls.priority if kleidi is not None and kleidi.is_available() else -1

    @classmethod
    def refusal(cls, spec: LayerSpec) -> str | None:
        if spec.bits != 4 or not spec.sym:
            return f"serves symmetric 4-bit weights, the layer is {'sym' if spec.sym else 'asym'} {spec.bits}-bit"
        if spec.effective_group % 32 or spec.in_features % 32:
            return f"needs group size and in_features divisible by 32, the layer has {spec.effective_group}"
        if spec.g_idx == "irregular":
            return "act-order g_idx whose groups are not runs of group_size inputs"
        return None

    @classmethod
    def compute_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        out_f, in_f = qw.shape
        if not bool((qw.zeros == 8).all()):
            raise ValueError("cpu-dyn4 needs the symmetric zero point 8 in every group")
        self.block = in_f if qw.group_size == -1 else qw.group_size
        codes = qw.codes.to(device=device, dtype=torch.uint8)
        perm = None
        if g_idx_kind(qw.g_idx, in_f, qw.group_size) == "permutable":
            perm = act_order_perm(qw.g_idx).to(device)
            codes = codes[:, perm]
        nibbles = codes[:, 0::2] | (codes[:, 1::2] << 4)                   # (N, K/2): even input low
        # KleidiAI takes fp32 scales per channel and bf16 scales per group (bf16 rounds the fp16 scales)
        sdt = torch.float32 if self.block == in_f else torch.bfloat16
        scales = qw.scales.to(device=device, dtype=sdt).contiguous()       # (N, G)
        self.register_buffer("qweight", _aten._dyn_quant_pack_4bit_weight(nibbles.contiguous(), scales, None,
                                                                          self.block, in_f, out_f))
        self.register_buffer("perm", perm)

    def matmul(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        y = _aten._dyn_quant_matmul_4bit(x.float().contiguous(), self.qweight, self.block,
                                         self.in_features, self.out_features)
        return y.to(x.dtype)


class CpuInt8Grouped(_CpuInt8Base):
    """8-bit with groups along the inputs: one `_weight_int8pack_mm` per group, summed in fp32.

    Slower than the dense matmul (one op call per group) but far faster than the reference's
    per-call unpacking (benchmarks/kernels.py), at 1 byte per weight.
    w = s_g (q - z_g) = s_g (q - 128) - s_g (z_g - 128): the second part is (x summed per group) @ C.
    """

    kernel_name: ClassVar[str] = "cpu-int8-grouped"
    priority: ClassVar[int] = 10
    cached_attrs: ClassVar[tuple[str, ...]] = ("gs",)

    @classmethod
    def grid_refusal(cls, spec: LayerSpec) -> str | None:
        if spec.effective_group == spec.in_features:
            return "serves grouped 8-bit weights; per-channel ones go to cpu-int8"
        if spec.out_features % 16 or spec.effective_group % 32:
            return (f"needs out_features % 16 == 0 and a group size divisible by 32, "
                    f"the layer is {spec.out_features}x{spec.in_features} in groups of {spec.effective_group}")
        if spec.g_idx == "irregular":
            return "act-order g_idx whose groups are not runs of group_size inputs"
        return None

    @classmethod
    def compute_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        out_f, in_f = qw.shape
        gs = qw.group_size
        n_groups = in_f // gs
        codes = qw.codes.to(device)
        perm = None
        if g_idx_kind(qw.g_idx, in_f, gs) == "permutable":
            perm = act_order_perm(qw.g_idx).to(device)
            codes = codes[:, perm]
        w8 = to_int8_centered(codes)                                                # (N, K)
        self.register_buffer("qweight", w8.reshape(out_f, n_groups, gs).transpose(0, 1).contiguous())  # (G, N, gs)
        self.register_buffer("scales", qw.scales.t().to(device=device, dtype=torch.bfloat16).contiguous())  # (G, N)
        shift = qw.zeros.float() - 128                                               # (N, G)
        self.register_buffer("zero_term", (qw.scales.float() * shift).t().contiguous().to(device)
                             if bool(shift.any()) else None)                         # (G, N)
        self.register_buffer("perm", perm)
        self.gs = gs

    def matmul(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        xb = x.to(torch.bfloat16)
        m = xb.shape[0]
        y = torch.zeros(m, self.out_features, dtype=torch.float32, device=x.device)
        for g in range(self.qweight.shape[0]):
            xg = xb[:, g * self.gs:(g + 1) * self.gs].contiguous()                  # (M, gs)
            y += _aten._weight_int8pack_mm(xg, self.qweight[g], self.scales[g]).float()
        if self.zero_term is not None:
            xsum = xb.float().reshape(m, -1, self.gs).sum(-1)                       # (M, G)
            y -= xsum @ self.zero_term
        return y.to(x.dtype)


class Dense(KernelLinear):
    """The weight dequantized once, at load, into a float matrix: `F.linear` per call.

    Bit-identical to the reference QuantLinear (which dequantizes the same way on every call) at the
    memory of the float model: what quality evaluation uses. Never chosen by kernel="auto".
    """

    kernel_name: ClassVar[str] = "dense"
    priority: ClassVar[int] = 0
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    serves_activations: ClassVar[bool] = True  # the input is fake-quantized as the reference does it
    numbers: ClassVar[tuple[str, ...]] = ("int", "float")

    @classmethod
    def rank(cls, spec: LayerSpec) -> int:
        """Never automatic, but for FP8 weights where no FP8 kernel serves the device (a CPU): there the
        weights are dequantized once at load, which beats the reference's dequantization on every call."""
        return 1 if spec.number == "float" else 0

    @classmethod
    def refusal(cls, spec: LayerSpec) -> str | None:
        return None

    def pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        self.register_buffer("weight", qw.dequantize(self.dtype).to(device))  # (out, in), as the reference computes it

    def matmul(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        # exactly the reference's call (one F.linear with the bias), so the result is bit-identical
        x = self.quantize_input(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), b)
