"""Pure per-Linear tensor functions of the conversion table (no I/O, no model).

Every packed format stores the same thing, an integer grid (codes, scales, zeros, g_idx);
repacking unpacks with the source layout and packs with the target layout. No float
arithmetic touches the codes, so an exact pair is exact to the bit. What a target cannot
hold (a zero of 0 in GPTQ v1, act-order in AWQ, 3 bits in AWQ) raises `NotExact`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.formats.awq import AWQLayout
from quantkit.formats.compressed_tensors import CTLayout
from quantkit.formats.layouts import GPTQLayout, Layout
from quantkit.grid import QuantizedWeight
from quantkit.scheme import QuantScheme


class NotExact(ValueError):
    """The target format cannot hold this grid exactly: `hint` names the closest path that can."""

    def __init__(self, msg: str, hint: str):
        super().__init__(msg)
        self.hint = hint


def target_layout(dst: str, sym: bool = True, g_idx: bool = False) -> Layout:
    if dst == "gptq":
        return GPTQLayout(1)
    if dst == "gptq-v2":
        return GPTQLayout(2)
    if dst == "awq":
        return AWQLayout()
    if dst == "compressed-tensors":
        return CTLayout(sym=sym, g_idx=g_idx)
    raise ValueError(f"no packed layout for {dst!r}")


def check_representable(qw: QuantizedWeight, dst: str, name: str) -> None:
    """Raise NotExact when `dst` cannot store this grid bit for bit."""
    if dst == "awq":
        if qw.bits != 4:
            raise NotExact(f"{name}: AWQ GEMM stores 4-bit weights only, this grid has {qw.bits} bits",
                           "--to gptq or --to compressed-tensors keep any bit width")
        if not qw.trivial_g_idx:
            raise NotExact(f"{name}: act-order (a non-trivial g_idx) cannot be stored in AWQ, which has no g_idx",
                           "--to compressed-tensors keeps the g_idx (actorder group), or --to gptq")
        if int(qw.zeros.max()) >= 1 << qw.bits:
            raise NotExact(f"{name}: a GPTQ v1 zero point of {int(qw.zeros.max())} does not fit in 4 bits",
                           "--to gptq-v2 cannot hold it either; keep GPTQ v1 or dequantize with --to hf")
    if dst == "gptq" and int(qw.zeros.min()) < 1:
        raise NotExact(f"{name}: GPTQ v1 stores zero-1 and cannot hold a zero point of 0",
                       "--to gptq-v2 stores zeros as they are")
    if dst in ("gptq-v2", "compressed-tensors") and int(qw.zeros.max()) >= 1 << qw.bits:
        raise NotExact(f"{name}: a GPTQ v1 zero point of {int(qw.zeros.max())} does not fit in {qw.bits} bits",
                       "keep GPTQ v1 or dequantize with --to hf")


def repack_linear(tensors: dict[str, Tensor], src: Layout, dst: Layout, dst_name: str, scheme: QuantScheme,
                  name: str = "linear") -> dict[str, Tensor]:
    """One Linear's tensors in the source layout -> the same integer grid in the target layout."""
    qw = src.unpack(tensors, scheme.bits, scheme.group_size, scheme.sym)
    check_representable(qw, dst_name, name)
    return dst.pack(qw)


def dequantize_linear(tensors: dict[str, Tensor], src: Layout, scheme: QuantScheme, dtype: torch.dtype) -> Tensor:
    """One Linear's packed tensors -> its (out, in) weight, computed in fp32 and cast to `dtype`.

    In fp32 this is bit-identical to what quantkit.load's QuantLinear computes.
    """
    qw = src.unpack(tensors, scheme.bits, scheme.group_size, scheme.sym)
    return qw.dequantize(torch.float32).to(dtype)


def cast_tensor(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Float tensors to `dtype`; integer tensors unchanged."""
    return t.to(dtype) if t.is_floating_point() else t
