"""AutoAWQ's GEMM checkpoint format ("version": "gemm"), as transformers, vLLM and SGLang load it.

Tensors of one quantized Linear (bits = 4, pack factor 8):
    qweight: (in, out/8)          int32, codes packed along the *output* dim
    qzeros:  (n_groups, out/8)    int32, zero points packed the same way, stored as is (no -1)
    scales:  (n_groups, out)      fp16
There is no g_idx: groups are always contiguous runs of `group_size` inputs.

Packing: word `c` of a row holds the 8 outputs 8c..8c+7, nibble `i` (bits 4i..4i+3)
holding output 8c + AWQ_ORDER[i]. The interleave [0, 2, 4, 6, 1, 3, 5, 7] is what
AutoAWQ's CUDA GEMM kernel unpacks. Dequantization: w = scale * (code - zero).
A symmetric grid (zero_point False) still stores its constant zeros (8 for 4 bits).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from torch import Tensor

from quantkit.errors import CheckpointError
from quantkit.formats.packing import check_range
from quantkit.grid import QuantizedWeight, trivial_g_idx
from quantkit.scheme import QuantScheme

AWQ_BITS = 4
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output AWQ_ORDER[i] of its 8
_PACK = 32 // AWQ_BITS


def pack_awq(values: Tensor) -> Tensor:
    """(R, N) integers in [0, 16) -> (R, N/8) int32 words in AutoAWQ's interleaved nibble order.

    The 8 values of a word are read as the 8 bytes of one int64 (byte p = output p), and nibble i
    takes byte AWQ_ORDER[i]: 8 shift-and-mask passes on contiguous data, no gather.
    """
    r, n = values.shape
    if n % _PACK:
        raise ValueError(f"cannot pack {n} columns: need a multiple of {_PACK}")
    check_range(values, AWQ_BITS)
    assert sys.byteorder == "little"
    v = values.to(torch.uint8).contiguous().reshape(-1).view(torch.int64).reshape(r, n // _PACK)
    words = torch.zeros_like(v)
    for i, p in enumerate(AWQ_ORDER):
        words |= ((v >> (8 * p)) & 0xF) << (AWQ_BITS * i)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement into int32
    return words.to(torch.int32)


def unpack_awq(words: Tensor) -> Tensor:
    """(R, N/8) int32 -> (R, N) int32 values; inverse of `pack_awq` (nibble i -> byte AWQ_ORDER[i])."""
    r, m = words.shape
    assert sys.byteorder == "little"
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for i, p in enumerate(AWQ_ORDER):
        out |= ((w >> (AWQ_BITS * i)) & 0xF) << (8 * p)
    return out.reshape(-1).view(torch.uint8).reshape(r, m * _PACK).to(torch.int32)


class AWQLayout:
    """QuantizedWeight <-> AutoAWQ GEMM tensors (qweight, qzeros, scales)."""

    name: ClassVar[str] = "awq"

    def shapes(self, out_f: int, in_f: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        ng = 1 if group_size == -1 else in_f // group_size
        return {
            "qweight": ((in_f, out_f // _PACK), torch.int32),
            "qzeros": ((ng, out_f // _PACK), torch.int32),
            "scales": ((ng, out_f), torch.float16),
        }

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        if qw.bits != AWQ_BITS:
            raise ValueError(f"the AWQ GEMM format stores 4-bit weights only, got {qw.bits} bits")
        if not qw.trivial_g_idx:
            raise ValueError("the AWQ GEMM format has no g_idx: groups must be contiguous (no act-order)")
        return {
            "qweight": pack_awq(qw.codes.t()),       # (in, out) -> (in, out/8)
            "qzeros": pack_awq(qw.zeros.t()),        # (n_groups, out) -> (n_groups, out/8)
            "scales": qw.scales.t().contiguous().to(torch.float16),
        }

    def unpack(self, t: dict[str, Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
        codes = unpack_awq(t["qweight"]).t()  # (out, in)
        zeros = unpack_awq(t["qzeros"]).t()   # (out, n_groups)
        return QuantizedWeight(
            codes=codes.contiguous().to(torch.uint8),
            scales=t["scales"].float().t().contiguous(),
            zeros=zeros.contiguous().to(torch.uint8),
            g_idx=trivial_g_idx(codes.shape[1], group_size).to(codes.device),
            bits=bits,
            group_size=group_size,
            sym=sym,
        )


def skip_patterns_for_transformers(skip: tuple[str, ...]) -> list[str]:
    """quantkit's fnmatch skip patterns as transformers' `modules_to_not_convert` (regex prefix or suffix)."""
    out = []
    for p in skip:
        if any(c in p for c in "*?["):
            out.append("".join(".*" if c == "*" else "." if c == "?" else "\\." if c == "." else c for c in p))
        else:
            out.append(p)
    return out


class AWQFormat:
    """quantization_config {quant_method: awq, bits: 4, group_size, zero_point, version: gemm}."""

    name: ClassVar[str] = "awq"

    def quantization_config(self, scheme: QuantScheme, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "quant_method": "awq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "zero_point": not scheme.sym,
            "version": "gemm",
            "modules_to_not_convert": skip_patterns_for_transformers(scheme.skip),
        }

    def matches(self, qc: dict[str, Any]) -> bool:
        return qc.get("quant_method") == "awq"

    def read(self, qc: dict[str, Any]) -> tuple[AWQLayout, QuantScheme]:
        version = str(qc.get("version", qc.get("format", "gemm"))).lower()
        if version != "gemm":
            raise CheckpointError(f"AWQ version {version!r} is not supported by quantkit.load; only 'gemm' is")
        bits = qc.get("bits", qc.get("w_bit", AWQ_BITS))
        if bits != AWQ_BITS:
            raise CheckpointError(f"malformed AWQ quantization_config: bits {bits}, the GEMM format holds 4")
        try:
            scheme = QuantScheme(bits=bits, group_size=qc.get("group_size", qc.get("q_group_size", 128)),
                                 sym=not qc.get("zero_point", True))
        except ValueError as e:
            raise CheckpointError(f"malformed AWQ quantization_config: {str(e).splitlines()[0]}") from None
        return AWQLayout(), scheme

    def side_files(self, qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """AutoAWQ wrote (and its loader read) quant_config.json beside config.json."""
        return {"quant_config.json": {
            "zero_point": qc["zero_point"],
            "q_group_size": qc["group_size"],
            "w_bit": qc["bits"],
            "version": "GEMM",
            "modules_to_not_convert": qc.get("modules_to_not_convert"),
        }}
