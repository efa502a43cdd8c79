"""CUDA kernels: GPTQModel's Linears when gptqmodel is installed, else torch's tinygemm int4 matmul.

GPTQModel's QuantLinear classes are built from the GPTQ tensors in the
"gptq_v2" convention (zeros stored as is), which is what GPTQModel converts
v1 checkpoints to before its kernels run. Its own `validate` says which
layers a class serves, so refusals quote GPTQModel's reason.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, ClassVar

import torch
from torch import Tensor

from quantkit.formats.layouts import GPTQLayout
from quantkit.grid import QuantizedWeight
from quantkit.kernels.base import KernelLinear, LayerSpec, missing_ops
from quantkit.kernels.int4 import int4_parts, int4_refusal

_aten = torch.ops.aten


def tinygemm_inner_k_tiles(in_features: int) -> int:
    """innerKTiles for `_convert_weight_to_int4pack`: K must be a multiple of innerKTiles * 16."""
    return next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)


def pack_tinygemm_nibbles(codes: Tensor) -> Tensor:
    """(N, K) codes in [0, 16) -> (N, K/2) uint8, even input in the high nibble (torch >= 2.5 tinygemm input)."""
    c = codes.to(torch.int32)
    return ((c[:, 0::2] << 4) | c[:, 1::2]).to(torch.uint8).contiguous()


class CudaTinygemm(KernelLinear):
    """2/3/4-bit through torch's `_weight_int4pack_mm` (tinygemm); computes in bf16."""

    kernel_name: ClassVar[str] = "cuda-tinygemm"
    priority: ClassVar[int] = 50
    devices: ClassVar[tuple[str, ...]] = ("cuda",)

    @classmethod
    def unavailable(cls) -> str | None:
        return missing_ops("_convert_weight_to_int4pack", "_weight_int4pack_mm")

    @classmethod
    def refusal(cls, spec: LayerSpec) -> str | None:
        return int4_refusal(spec, n_multiple=8)

    @classmethod
    def compute_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16

    def pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        parts = int4_parts(qw, device)
        self.qgs = parts.qgs
        nibbles = pack_tinygemm_nibbles(parts.codes)
        self.register_buffer("qweight", _aten._convert_weight_to_int4pack(
            nibbles, tinygemm_inner_k_tiles(self.in_features)))
        self.register_buffer("scales_zeros", parts.scales_zeros.to(torch.bfloat16))
        self.register_buffer("perm", parts.perm)

    def matmul(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        y = _aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight, self.qgs, self.scales_zeros)
        return y.to(x.dtype)


class GPTQModelKernel(KernelLinear):
    """A GPTQModel QuantLinear class behind quantkit's kernel interface (fp16/bf16 compute)."""

    module_path: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()   # the class's names across GPTQModel releases
    devices: ClassVar[tuple[str, ...]] = ("cuda",)

    @classmethod
    def gptq_class(cls) -> Any:
        mod = importlib.import_module(cls.module_path)
        for name in cls.class_names:
            if hasattr(mod, name):
                return getattr(mod, name)
        raise ImportError(f"{cls.module_path} has none of {', '.join(cls.class_names)}")

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("gptqmodel") is None:
            return "gptqmodel is not installed (pip install gptqmodel)"
        try:
            cls.gptq_class()
        except Exception as e:  # an installed gptqmodel that cannot import (no CUDA build, version skew)
            return f"gptqmodel cannot provide it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        return None

    @classmethod
    def compute_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16

    @classmethod
    def refusal(cls, spec: LayerSpec) -> str | None:
        ok, err = cls.gptq_class().validate(
            bits=spec.bits, group_size=spec.group_size, desc_act=spec.g_idx != "trivial", sym=spec.sym,
            in_features=spec.in_features, out_features=spec.out_features, pack_dtype=torch.int32,
            dtype=cls.compute_dtype(spec.dtype), device=torch.device(spec.device_type))
        if ok:
            return None
        return f"gptqmodel refuses: {str(err).splitlines()[0]}" if err else "gptqmodel refuses the layer"

    def pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        out_f, in_f = qw.shape
        spec_trivial = bool(qw.trivial_g_idx)
        inner = self.gptq_class()(bits=qw.bits, group_size=qw.group_size, sym=qw.sym, desc_act=not spec_trivial,
                                  in_features=in_f, out_features=out_f, bias=False, pack_dtype=torch.int32,
                                  register_buffers=True)
        cd = self.compute_dtype(self.dtype)
        for name, t in GPTQLayout(version=2).pack(qw).items():
            setattr(inner, name, t.to(device=device, dtype=cd if t.is_floating_point() else t.dtype))
        inner = inner.to(device)
        inner.post_init()
        self.inner = inner

    def matmul(self, x: Tensor) -> Tensor:
        return self.inner(x.to(self.compute_dtype(self.dtype))).to(x.dtype)


class GPTQModelMarlin(GPTQModelKernel):
    kernel_name: ClassVar[str] = "gptqmodel-marlin"
    priority: ClassVar[int] = 90
    module_path: ClassVar[str] = "gptqmodel.nn_modules.qlinear.marlin"
    class_names: ClassVar[tuple[str, ...]] = ("MarlinLinear", "MarlinQuantLinear")


class GPTQModelExllamaV2(GPTQModelKernel):
    kernel_name: ClassVar[str] = "gptqmodel-exllamav2"
    priority: ClassVar[int] = 80
    module_path: ClassVar[str] = "gptqmodel.nn_modules.qlinear.exllamav2"
    class_names: ClassVar[tuple[str, ...]] = ("ExllamaV2Linear", "ExllamaV2QuantLinear")


class GPTQModelTorch(GPTQModelKernel):
    """GPTQModel's pure-torch Linear: any bits; on CPU only when asked for (not measured faster there)."""

    kernel_name: ClassVar[str] = "gptqmodel-torch"
    priority: ClassVar[int] = 60
    module_path: ClassVar[str] = "gptqmodel.nn_modules.qlinear.torch"
    class_names: ClassVar[tuple[str, ...]] = ("TorchLinear", "TorchQuantLinear")
    devices: ClassVar[tuple[str, ...]] = ("cuda", "cpu")

    @classmethod
    def rank(cls, spec: LayerSpec) -> int:
        return cls.priority if spec.device_type == "cuda" else -1
