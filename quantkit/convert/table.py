"""The conversion table: (source format, target format) -> the pure tensor function that converts, exact or lossy.

A pair that is not in the table fails with one line that names the closest path that exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quantkit.convert.repack import cast_tensor, dequantize_linear, repack_linear
from quantkit.convert.source import FORMAT_NAMES, PACKED
from quantkit.errors import UnknownNameError, QuantkitError

TARGETS = ("hf", "gptq", "gptq-v2", "awq", "compressed-tensors", "gguf")


@dataclass(frozen=True)
class Conversion:
    src: str
    dst: str
    exact: bool              # exact to the bit (under `note`'s conditions); otherwise lossy
    fn: Callable[..., Any]   # the per-tensor pure function
    note: str


def _gguf_fn() -> Callable[..., Any]:
    from quantkit.convert.gguf_tensors import encode_weight

    return encode_weight


def _build() -> dict[tuple[str, str], Conversion]:
    table: dict[tuple[str, str], Conversion] = {}
    for s in PACKED:
        for d in PACKED:
            if s == d:
                continue
            cond = {"awq": "4 bits, no act-order g_idx", "gptq": "zero points >= 1"}.get(d, "same grid")
            table[s, d] = Conversion(s, d, True, repack_linear, f"repack the integer grid ({cond})")
        table[s, "hf"] = Conversion(s, "hf", True, dequantize_linear,
                                    "dequantize (bit-identical at float32)")
        table[s, "gguf"] = Conversion(s, "gguf", True, _gguf_fn(),
                                      "4-bit grid -> q4_1/q4_0, 8-bit -> q8_0 keep the codes (act-order: re-quantized, warned)")
    table["hf", "hf"] = Conversion("hf", "hf", True, cast_tensor, "copy, casting floats to --dtype")
    table["hf", "gguf"] = Conversion("hf", "gguf", False, _gguf_fn(),
                                     "f32 copies fp32; other types round")
    table["gguf", "hf"] = Conversion("gguf", "hf", True, cast_tensor,
                                     "dequantize any type gguf reads (K-quants too)")
    return table


TABLE: dict[tuple[str, str], Conversion] = _build()


def closest(src: str, dst: str) -> str:
    """One line: why (src, dst) has no entry and which path is the closest that exists."""
    if src == dst:
        return f"{src} -> {dst}: the source is already {dst}" + (
            "; use --to hf to change the dtype" if src == "gguf" else "")
    if src in ("hf", "gguf") and dst in PACKED:
        via = "first --to hf, then " if src == "gguf" else ""
        method = "awq" if dst == "awq" else "gptq"  # quantize writes GPTQ (gptq, rtn) or AWQ (awq) checkpoints
        then = "" if dst in ("gptq", "awq") else f", then quantkit convert OUT OUT2 --to {dst}"
        return (f"{src} -> {dst} needs quantization, not conversion: {via}"
                f"quantkit quantize MODEL --method {method} -o OUT{then}")
    if src == "gguf" and dst == "gguf":
        return "gguf -> gguf re-typing is llama.cpp's llama-quantize; quantkit converts gguf --to hf"
    return f"no conversion {src} -> {dst}; quantkit convert --list shows the table"


def lookup(src: str, dst: str) -> Conversion:
    if dst not in TARGETS:
        raise UnknownNameError(f"unknown target format {dst!r}; choose one of: {', '.join(TARGETS)}")
    if src not in FORMAT_NAMES:
        raise UnknownNameError(f"unknown source format {src!r}; quantkit converts from: {', '.join(FORMAT_NAMES)}")
    conv = TABLE.get((src, dst))
    if conv is None:
        raise QuantkitError(closest(src, dst))
    return conv


def rows() -> list[dict[str, str]]:
    """The table for `quantkit convert --list`."""
    return [{"from": c.src, "to": c.dst, "kind": "exact" if c.exact else "lossy", "how": c.note}
            for c in TABLE.values()]
