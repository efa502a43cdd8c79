"""Kernel registry, per-layer selection and the post-load pass that swaps QuantLinears for kernels.

`kernel="auto"` picks, per layer, the accepting kernel of highest rank (ranks come
from benchmarks/kernels.py), falling back to the reference QuantLinear;
`kernel="reference"` keeps the reference; any other name forces that kernel
and fails with one line when it cannot serve a layer.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from quantkit.errors import UnknownNameError
from quantkit.formats.qlinear import QuantLinear
from quantkit.kernels.base import KernelError, KernelLinear, LayerSpec, spec_of
from quantkit.kernels.cpu import CpuDynQuant4, CpuInt4, CpuInt8, CpuInt8Grouped, Dense
from quantkit.kernels.cuda import CudaTinygemm, GPTQModelExllamaV2, GPTQModelMarlin, GPTQModelTorch
from quantkit.kernels.unpack import fast_quantized
from quantkit.kernels.w8a8 import FP8ScaledMM, W8A8Int8

log = logging.getLogger(__name__)

REFERENCE = "reference"
AUTO = "auto"

KERNELS: dict[str, type[KernelLinear]] = {k.kernel_name: k for k in (
    CpuInt4, CpuInt8, CpuInt8Grouped, CpuDynQuant4, CudaTinygemm, GPTQModelMarlin, GPTQModelExllamaV2, GPTQModelTorch,
    W8A8Int8, FP8ScaledMM, Dense)}


def kernel_names() -> list[str]:
    """Every value `kernel=` / `--kernel` accepts."""
    return [AUTO, REFERENCE, *KERNELS]


def check_kernel_name(kernel: str) -> None:
    if kernel not in (AUTO, REFERENCE) and kernel not in KERNELS:
        raise UnknownNameError(f"unknown kernel {kernel!r}; choose one of: {', '.join(kernel_names())}")


def select_kernel(spec: LayerSpec, kernel: str = AUTO, layer: str = "layer") -> type[KernelLinear] | None:
    """The kernel class serving a layer of `spec` (None = the reference QuantLinear)."""
    check_kernel_name(kernel)
    if kernel == REFERENCE:
        return None
    if kernel != AUTO:
        reason = KERNELS[kernel].check(spec)
        if reason:
            raise KernelError(f"kernel {kernel!r} cannot serve {layer}: {reason}; use --kernel auto or reference")
        return KERNELS[kernel]
    ranked = sorted((k for k in KERNELS.values() if k.rank(spec) > 0), key=lambda k: -k.rank(spec))
    return next((k for k in ranked if k.check(spec) is None), None)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The activations' dtype: that of the model's first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _module_device(m: nn.Module) -> torch.device:
    return next(iter(m.buffers())).device


def apply_kernels(model: nn.Module, kernel: str = AUTO, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Replace each reference QuantLinear of `model` by its kernel module, in place; returns `kernels_used`.

    Runs after the model is on its device: kernels pack on the device they run on.
    """
    check_kernel_name(kernel)
    if kernel != REFERENCE:
        dtype = dtype or model_dtype(model)
        targets = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, QuantLinear) and not isinstance(m, KernelLinear)]
        for name, mod in targets:
            qw = fast_quantized(mod, codes=False)  # the grid; codes unpacked (or not) by the chosen kernel
            device = _module_device(mod)
            act = getattr(mod, "act", None)
            tag = "" if act is None else f"{act.type}-{act.strategy}"
            cls = select_kernel(spec_of(qw, device, dtype, tag), kernel, layer=name)
            if cls is None:
                continue
            new = cls.from_module(mod, qw, device, dtype)
            new.attach_activations(mod)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
            del mod, qw  # the checkpoint buffers go with the reference module
    used = kernels_used(model)
    if used:
        log.info("kernels: %s", ", ".join(f"{k} x{v}" for k, v in sorted(used.items())))
    return used


def kernels_used(model: nn.Module) -> dict[str, int]:
    """{kernel name: number of quantized Linears it serves} ("reference" for the plain QuantLinear)."""
    return dict(Counter(getattr(m, "kernel_name", REFERENCE) for m in model.modules() if isinstance(m, QuantLinear)))
