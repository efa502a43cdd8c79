"""Kernels for weights *and* activations in 8 bits (compressed-tensors int-quantized / float-quantized).

Both quantize each input row on the fly (per token, or with the checkpoint's static input scale), multiply in
8 bits and rescale the result by (activation scale) x (weight scale):

    y[m, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] * q_w[n, k]

- `w8a8-int8`: int8 x int8 -> int32 on `torch._int_mm` (x86 CPUs through oneDNN/VNNI, CUDA from Turing on);
  the integer sums are exact, so it differs from the reference's fake-quantized float matmul only by float
  rounding of the rescale. Measured here: about 5x the fp32 GEMM at 512 x 576 x 1536 (benchmarks/w8a8.py).
- `fp8-scaled-mm`: e4m3 x e4m3 on `torch._scaled_mm` with row-wise scales: on CUDA where the device has FP8
  (compute capability 8.9: Ada, Hopper); chosen automatically only there. A CPU without FP8 runs FP8
  checkpoints dequantized (the dense kernel), and the eval table's kernels column says so.
The code paths are device-agnostic; CUDA-specific constraints (M > 16 for `_int_mm`, bf16 output for row-wise
`_scaled_mm`) are handled in `matmul`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from quantkit.grid import FP8_DTYPE, FP8_MAX, QuantizedWeight, int8_activations
from quantkit.kernels.base import KernelLinear, LayerSpec, missing_ops

_INT_MM_MIN_ROWS_CUDA = 17  # cuBLAS int8 GEMM needs M > 16


def _static_scale(mod: KernelLinear) -> Tensor | None:
    act = getattr(mod, "act", None)
    return None if act is None or act.dynamic else mod.input_scale


class _W8A8Base(KernelLinear):
    serves_activations: ClassVar[bool] = True
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    want: ClassVar[str] = "int"

    @classmethod
    def refusal(cls, spec: LayerSpec) -> str | None:
        if not spec.activations.startswith(cls.want + "-"):
            return f"serves layers with {cls.want} 8-bit activations, the layer has {spec.activations or 'none'}"
        if spec.bits != 8 or spec.group_size != -1 or not spec.sym:
            return "serves symmetric 8-bit weights per channel or per tensor"
        if spec.in_features % 16 or spec.out_features % 16:
            return f"needs in and out features divisible by 16, the layer is {spec.out_features}x{spec.in_features}"
        return None

    def pack_scales(self, qw: QuantizedWeight, device: torch.device) -> None:
        self.register_buffer("weight_scale", qw.scales[:, 0].float().to(device).contiguous())  # (N,)


class W8A8Int8(_W8A8Base):
    kernel_name: ClassVar[str] = "w8a8-int8"
    priority: ClassVar[int] = 40

    @classmethod
    def unavailable(cls) -> str | None:
        return missing_ops("_int_mm")

    def pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        # (N, K) int8 q - 128; `_int_mm` takes its transpose, a column-major (K, N) view (the fast layout)
        self.register_buffer("qweight", (qw.codes.to(device=device, dtype=torch.uint8) ^ 0x80).view(torch.int8)
                             .contiguous())
        self.pack_scales(qw, device)

    def matmul(self, x: Tensor) -> Tensor:
        q, s = int8_activations(x, _static_scale(self))                     # (M, K) int8, (M, 1) fp32
        m = q.shape[0]
        if q.is_cuda and m < _INT_MM_MIN_ROWS_CUDA:
            q = F.pad(q, (0, 0, 0, _INT_MM_MIN_ROWS_CUDA - m))
        acc = torch._int_mm(q, self.qweight.t())[:m]                        # (M, N) int32, exact
        return acc.float().mul_(s).mul_(self.weight_scale).to(x.dtype)


def fp8_activations(x: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(float8_e4m3fn (M, K), float32 scale (M, 1)): per-token max|x| / 448, or the static scale."""
    xf = x.float()
    if scale is None:
        s = xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX
        s = torch.where(s == 0, torch.finfo(torch.float32).eps, s)
    else:
        s = scale.float().to(x.device).expand(x.shape[0], 1)
    return (xf / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s.contiguous()


class FP8ScaledMM(_W8A8Base):
    kernel_name: ClassVar[str] = "fp8-scaled-mm"
    priority: ClassVar[int] = 40
    want: ClassVar[str] = "float"
    numbers: ClassVar[tuple[str, ...]] = ("float",)

    @classmethod
    def unavailable(cls) -> str | None:
        return missing_ops("_scaled_mm")

    @classmethod
    def rank(cls, spec: LayerSpec) -> int:
        """Automatic only on a CUDA device with FP8 (8.9+); on CPU `_scaled_mm` emulates FP8 (force it by name)."""
        if spec.device_type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
            return cls.priority
        return -1

    def pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        self.register_buffer("qweight", qw.codes.to(device=device, dtype=FP8_DTYPE).contiguous())  # (N, K)
        self.pack_scales(qw, device)

    def matmul(self, x: Tensor) -> Tensor:
        q, s = fp8_activations(x, _static_scale(self))
        out_dtype = torch.bfloat16 if q.is_cuda else torch.float32  # row-wise scaling on CUDA outputs bf16
        y = torch._scaled_mm(q, self.qweight.t(), scale_a=s, scale_b=self.weight_scale[None, :].contiguous(),
                             out_dtype=out_dtype)
        return y.to(x.dtype)
