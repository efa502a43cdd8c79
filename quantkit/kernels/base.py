"""The kernel interface: a QuantLinear whose weights are packed once, at load time, for a fast matmul.

A kernel class declares what it serves through `refusal(spec)` (None = accepts,
else one line saying why not), packs a format-independent `QuantizedWeight`
in `pack`, and computes `matmul(x2d)`. All kernels share this interface, so
one set of correctness tests covers them all.

Kernel modules subclass the reference `QuantLinear` (code that counts
QuantLinears keeps working) but hold only their packed tensors, never the
checkpoint's, so the model's memory is what the kernel needs.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.formats.layouts import Layout
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import QuantizedWeight
from quantkit.kernels.unpack import fast_codes

# g_idx kinds: "trivial" (contiguous groups), "permutable" (act-order: sorting the input
# columns by group makes the groups contiguous runs of group_size), "irregular" (anything else).
GIdxKind = Literal["trivial", "permutable", "irregular"]


class KernelError(QuantkitError):
    """A kernel that was asked for cannot serve a layer (or is not installed)."""


@dataclass(frozen=True)
class LayerSpec:
    """What a kernel needs to know to accept or refuse one quantized Linear."""

    out_features: int
    in_features: int
    bits: int
    group_size: int        # -1 = one group per output channel
    sym: bool
    g_idx: GIdxKind
    device_type: str       # "cpu", "cuda", ...
    dtype: torch.dtype     # the activations' (model's) dtype
    number: str = "int"    # the weights' number type: int codes or float (FP8 e4m3) values
    activations: str = ""  # "" (weight-only) or the input quantization: "int-token", "float-tensor", ...

    @property
    def effective_group(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size


def g_idx_kind(g_idx: Tensor, in_features: int, group_size: int) -> GIdxKind:
    gs = in_features if group_size == -1 else group_size
    trivial = torch.arange(in_features, dtype=torch.int64, device=g_idx.device) // gs
    g = g_idx.to(torch.int64)
    if torch.equal(g, trivial):
        return "trivial"
    if torch.equal(torch.sort(g, stable=True).values, trivial):
        return "permutable"
    return "irregular"


def act_order_perm(g_idx: Tensor) -> Tensor:
    """(in,) int64 permutation that sorts input columns by group (stable): x[:, perm] meets contiguous groups."""
    return torch.argsort(g_idx.to(torch.int64), stable=True)


def spec_of(qw: QuantizedWeight, device: torch.device | str, dtype: torch.dtype, activations: str = "") -> LayerSpec:
    out_f, in_f = qw.shape
    return LayerSpec(out_f, in_f, qw.bits, qw.group_size, qw.sym, g_idx_kind(qw.g_idx, in_f, qw.group_size),
                     torch.device(device).type, dtype, "float" if qw.is_float else "int", activations)


def grid_zero_floats(qw: QuantizedWeight, mid: int) -> tuple[Tensor, Tensor]:
    """Scales and float zeros for kernels computing w = (q - mid) * s + zf (torch's int4pack convention).

    w = s * (q - z) = (q - mid) * s + s * (mid - z), so zf = s * (mid - z), exact in fp32
    (fp16 scale times a small integer). Returns (out, G) float32 each.
    """
    s = qw.scales.float()
    return s, s * (mid - qw.zeros.float())


class KernelLinear(QuantLinear, ABC):
    """Base of every kernel: holds packed tensors, computes y = x W^T + b through `matmul`."""

    kernel_name: ClassVar[str] = "reference"
    priority: ClassVar[int] = 0              # larger = preferred by kernel="auto" (measured, benchmarks/kernels.py)
    devices: ClassVar[tuple[str, ...]] = ()  # device types the kernel runs on
    quantizes_activations: ClassVar[bool] = False  # rounds activations to int8 (a looser tolerance)
    cacheable: ClassVar[bool] = False        # its buffers (+ cached_attrs) rebuild it: the packed-weight cache may keep them
    cached_attrs: ClassVar[tuple[str, ...]] = ()  # plain-int attributes `pack` sets besides buffers
    # serves layers whose checkpoint quantizes their input activations (W8A8, FP8); the others are weight-only
    serves_activations: ClassVar[bool] = False
    numbers: ClassVar[tuple[str, ...]] = ("int",)  # weight number types it serves

    def __init__(self, qw: QuantizedWeight, layout: Layout, device: torch.device | str, dtype: torch.dtype,
                 **pack_kw: Tensor):
        nn.Module.__init__(self)  # deliberately not QuantLinear.__init__: no checkpoint buffers
        self.act = None  # set by attach_activations for W8A8 / FP8 layers
        out_f, in_f = qw.shape
        self.in_features, self.out_features = in_f, out_f
        self.bits, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        self.layout = layout
        self.dtype = dtype
        bias = None if qw.bias is None else qw.bias.to(device=device, dtype=dtype)
        self.register_buffer("bias", bias)
        self.pack(qw, torch.device(device), **pack_kw)

    @classmethod
    def from_module(cls, mod: QuantLinear, qw: QuantizedWeight, device: torch.device | str,
                    dtype: torch.dtype) -> "KernelLinear":
        """The kernel module serving the reference `mod`, whose grid is `qw`.

        qw's codes may still be on the meta device (not unpacked): this default unpacks them;
        a kernel that can pack the checkpoint's words directly overrides it.
        """
        if qw.codes.is_meta:
            qw = dataclasses.replace(qw, codes=fast_codes(mod))
        return cls(qw, mod.layout, device, dtype)

    # ---- what a kernel implements -------------------------------------------------
    @classmethod
    def unavailable(cls) -> str | None:
        """Why the kernel cannot run in this process at all (missing op or package), else None."""
        return None

    @classmethod
    def rank(cls, spec: LayerSpec) -> int:
        """Preference of kernel="auto" for this layer; <= 0 means never chosen automatically."""
        return cls.priority

    @classmethod
    @abstractmethod
    def refusal(cls, spec: LayerSpec) -> str | None:
        """Why the kernel cannot serve a layer of this spec, else None."""

    @classmethod
    def compute_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        """The dtype the matmul runs in for activations of `dtype` (sets the test tolerance)."""
        return dtype

    @abstractmethod
    def pack(self, qw: QuantizedWeight, device: torch.device) -> None:
        """Register the packed buffers built from `qw` on `device` (called once, at load)."""

    @abstractmethod
    def matmul(self, x: Tensor) -> Tensor:
        """(M, in) activations -> (M, out) in x.dtype, without bias."""

    # ---- shared -------------------------------------------------------------------
    @classmethod
    def check(cls, spec: LayerSpec) -> str | None:
        missing = cls.unavailable()
        if missing:
            return missing
        if spec.device_type not in cls.devices:
            return f"runs on {'/'.join(cls.devices)} only, the model is on {spec.device_type}"
        if spec.number not in cls.numbers:
            return f"serves {'/'.join(cls.numbers)} weights, the layer's are {spec.number} (FP8)"
        if spec.activations and not cls.serves_activations:
            return f"weight-only kernel: the layer quantizes its input activations ({spec.activations})"
        return cls.refusal(spec)

    def attach_activations(self, mod: QuantLinear) -> None:
        """Carry the reference module's activation scheme (and static input scale) over to this kernel."""
        self.act = getattr(mod, "act", None)
        if self.act is not None and not self.act.dynamic:
            self.register_buffer("input_scale", mod.input_scale.to(self._device()))

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x) if not self.serves_activations else x
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features))  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def cache_record(self) -> dict:
        """What, besides its buffers, rebuilds this module (`restore`): the packed-weight cache's record."""
        return {"kernel": self.kernel_name, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "attrs": {a: getattr(self, a) for a in self.cached_attrs}}

    @classmethod
    def restore(cls, record: dict, layout: Layout, dtype: torch.dtype, buffers: dict[str, Tensor | None]
                ) -> "KernelLinear":
        """The module `cache_record()` and its buffers describe, without packing anything."""
        if record["kernel"] != cls.kernel_name or set(record["attrs"]) != set(cls.cached_attrs):
            raise ValueError(f"record of kernel {record['kernel']!r} given to {cls.kernel_name!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.act = None  # cached kernels are weight-only
        self.in_features, self.out_features = int(record["in_features"]), int(record["out_features"])
        self.bits, self.group_size, self.sym = int(record["bits"]), int(record["group_size"]), bool(record["sym"])
        self.layout, self.dtype = layout, dtype
        for name, value in record["attrs"].items():
            setattr(self, name, value)
        for name, t in buffers.items():
            self.register_buffer(name, t)
        return self

    def quantized(self) -> QuantizedWeight:
        raise KernelError(f"this layer was packed for kernel {self.kernel_name!r}; "
                          "load with kernel='reference' to read its quantized weights")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(out, in) weight as the kernel computes it: the kernel applied to the identity (compute-dtype exact)."""
        eye = torch.eye(self.in_features, dtype=dtype, device=self._device())
        return self.matmul(eye).t().contiguous()

    def buffers_dict(self) -> dict[str, Tensor]:
        return dict(self.named_buffers(recurse=False))

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel={self.kernel_name}"


def missing_ops(*names: str) -> str | None:
    """Why a kernel is unavailable: the aten ops this torch build lacks (None when all exist)."""
    missing = [n for n in names if not hasattr(torch.ops.aten, n)]
    return f"this torch ({torch.__version__}) has no {', '.join(missing)}" if missing else None
