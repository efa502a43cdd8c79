"""Checkpoint tensor layouts of a quantized Linear: QuantizedWeight <-> named tensors.

A layout knows one format's tensor names, shapes, dtypes and packing. Writers
use `pack`, the loader uses `shapes` (to assert what it reads) and `unpack`.
New formats (AWQ, compressed-tensors) register a layout here.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import Tensor

from quantkit.formats.awq import AWQLayout
from quantkit.formats.compressed_tensors import CTLayout
from quantkit.formats.packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from quantkit.grid import QuantizedWeight


class Layout(Protocol):
    name: ClassVar[str]

    def shapes(self, out_f: int, in_f: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]: ...

    def unpack(self, t: dict[str, Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight: ...


def n_groups(in_f: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_f // group_size


class GPTQLayout:
    """AutoGPTQ's layout (checkpoint_format "gptq", i.e. v1; "gptq_v2" stores zeros without the -1).

    qweight: (in*bits/32, out)          int32, codes packed along the input dim
    qzeros:  (n_groups, out*bits/32)    int32, (zero - 1) packed along the output dim (v1)
    scales:  (n_groups, out)            fp16
    g_idx:   (in,)                      int32
    """

    name: ClassVar[str] = "gptq"

    def __init__(self, version: int = 1):
        assert version in (1, 2)
        self.zero_offset = 1 if version == 1 else 0

    def shapes(self, out_f, in_f, bits, group_size):
        ng = n_groups(in_f, group_size)
        return {
            "qweight": ((in_f * bits // 32, out_f), torch.int32),
            "qzeros": ((ng, out_f * bits // 32), torch.int32),
            "scales": ((ng, out_f), torch.float16),
            "g_idx": ((in_f,), torch.int32),
        }

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        zeros = qw.zeros.to(torch.int64).t() - self.zero_offset  # (n_groups, out)
        if int(zeros.min()) < 0:
            raise ValueError("GPTQ v1 cannot store a zero point of 0; fit grids with zero >= 1")
        return {
            "qweight": pack_rows(qw.codes.t(), qw.bits),
            "qzeros": pack_cols(zeros, qw.bits),
            "scales": qw.scales.t().contiguous().to(torch.float16),
            "g_idx": qw.g_idx.to(torch.int32).contiguous(),
        }

    def unpack(self, t, bits, group_size, sym):
        codes = unpack_rows(t["qweight"], bits).t()  # (out, in)
        zeros = unpack_cols(t["qzeros"], bits) + self.zero_offset  # (n_groups, out)
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scales=t["scales"].float().t().contiguous(),
            zeros=zeros.t().contiguous().to(torch.uint8),
            g_idx=t["g_idx"].to(torch.int32),
            bits=bits,
            group_size=group_size,
            sym=sym,
        )


LAYOUTS: dict[str, type] = {"gptq": GPTQLayout, "awq": AWQLayout, "compressed-tensors": CTLayout}


def get_layout(fmt: str, **kw) -> Layout:
    return LAYOUTS[fmt](**kw)
