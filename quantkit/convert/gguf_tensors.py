"""Pure tensor functions for GGUF export: the Q/K row permutation and the block encodings.

GGUF block types run along a row (the input dim), 32 weights per block:
    Q4_0  d:fp16, 16 bytes of nibbles       w = d * (q - 8)
    Q4_1  d:fp16, m:fp16, 16 bytes          w = d * q + m
    Q8_0  d:fp16, 32 int8                   w = d * q
Nibble byte j of a 4-bit block holds q[j] (low) and q[j+16] (high).

A GPTQ/AWQ/compressed-tensors grid w = s * (code - z) whose groups are contiguous runs of
32k inputs maps onto these blocks with its integer codes untouched: every 32-block of a
group takes the group's scale as d; Q4_1 takes m = -s*z (the only value rounded, to fp16),
Q4_0 takes q = code - z + 8 when that fits in [0, 16), Q8_0 q = code - z when it fits in
int8. Anything else (act-order g_idx, an asymmetric grid into Q4_0) is re-quantized from
the dequantized weights by the gguf package's quantizer, and the added error is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gq
from torch import Tensor

from quantkit.convert.gguf_quant import ENCODERS, dequantize_rows, quantize_rows
from quantkit.grid import QuantizedWeight

Q = GGMLQuantizationType
GGUF_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
    "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1,
}
FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1,
}
TYPE_BITS: dict[str, int] = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5}
BLOCK = 32


def qk_permutation(out_f: int, n_head: int) -> Tensor:
    """Row order llama.cpp's converter gives Llama q/k weights: per head, interleave the two rotary halves.

    New row h*d + 2j + i holds old row h*d + i*(d/2) + j  (d = out_f / n_head, i in {0, 1}).
    """
    d = out_f // n_head
    return torch.arange(out_f).reshape(n_head, 2, d // 2).transpose(1, 2).reshape(-1)


def permute_rows(qw: QuantizedWeight, idx: Tensor) -> QuantizedWeight:
    return QuantizedWeight(codes=qw.codes[idx], scales=qw.scales[idx], zeros=qw.zeros[idx], g_idx=qw.g_idx,
                           bits=qw.bits, group_size=qw.group_size, sym=qw.sym,
                           bias=None if qw.bias is None else qw.bias[idx])


def byte_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and numpy dtype of the array the GGUF writer receives for a tensor of `shape` in `qtype`."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32)
    if qtype == Q.F16:
        return shape, np.dtype(np.float16)
    block, size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8)


CHUNK = 1 << 22  # elements quantized at a time: bounds the float32 intermediates of a large embedding
K_CHUNK = 1 << 19  # the same for the searched encoders, whose intermediates are many (n, B) float32 arrays


def encode_float(w: Tensor, qtype: GGMLQuantizationType, qw: np.ndarray | None = None) -> np.ndarray:
    """A float tensor (any float dtype) in `qtype`, rounded as llama-quantize rounds it.

    `qw` (in,): per-input-column importance (llama.cpp's imatrix), for the weighted search.
    Rows are converted in chunks of about CHUNK elements (K_CHUNK for the searched types), so
    the memory beyond the output array is one chunk, not a float32 copy of the whole tensor.
    """
    w = w.detach().cpu()
    if qtype == Q.F32:
        return w.to(torch.float32).numpy()
    if qtype == Q.F16:
        return w.to(torch.float16).numpy()
    if w.dim() == 1:
        return gq.quantize(w.to(torch.float32).numpy(), qtype)
    shape, dtype = byte_shape(tuple(w.shape), qtype)
    out = np.empty(shape, dtype)
    searched = qw is not None or qtype in ENCODERS
    step = max(1, (K_CHUNK if searched else CHUNK) // w.shape[-1])
    for r in range(0, w.shape[0], step):
        out[r:r + step] = quantize_rows(w[r:r + step].to(torch.float32).numpy(), qtype, qw)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(rows, n_blocks, 32) values in [0, 16) -> (rows, n_blocks, 16) bytes: q[j] | q[j+16] << 4."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def grid_blocks(qw: QuantizedWeight, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """The integer grid as `qtype` blocks with its codes unchanged, or None when that is impossible."""
    out_f, in_f = qw.shape
    if qtype not in (Q.Q4_0, Q.Q4_1, Q.Q8_0) or in_f % BLOCK or not qw.trivial_g_idx:
        return None
    gs = in_f if qw.group_size == -1 else qw.group_size
    if gs % BLOCK:
        return None
    nb = in_f // BLOCK
    group_of_block = (torch.arange(nb) * BLOCK) // gs                     # (nb,)
    s = qw.scales[:, group_of_block].float()                             # (out, nb)
    z = qw.zeros[:, group_of_block].to(torch.int32)                      # (out, nb)
    codes = qw.codes.to(torch.int32).reshape(out_f, nb, BLOCK)           # (out, nb, 32)
    d = s.to(torch.float16).numpy().view(np.uint8).reshape(out_f, nb, 2)  # exact: scales are fp16 values
    if qtype == Q.Q4_1:
        if qw.bits != 4:
            return None
        m = (-(s * z.float())).to(torch.float16).numpy().view(np.uint8).reshape(out_f, nb, 2)
        qs = _nibbles(codes.numpy())
        return np.concatenate([d, m, qs], axis=-1).reshape(out_f, -1)
    shifted = codes - z[..., None]                                        # code - zero, (out, nb, 32)
    if qtype == Q.Q4_0:
        if qw.bits != 4 or int(shifted.min()) < -8 or int(shifted.max()) > 7:
            return None
        return np.concatenate([d, _nibbles((shifted + 8).numpy())], axis=-1).reshape(out_f, -1)
    if qw.bits != 8 or int(shifted.min()) < -128 or int(shifted.max()) > 127:
        return None
    qs = shifted.to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(out_f, -1)


@dataclass
class EncodeStats:
    """What an export did: tensors kept on their grid, re-quantized (with the error added), plain floats."""

    exact: list[str] = field(default_factory=list)
    requantized: dict[str, str] = field(default_factory=dict)  # name -> reason
    err_sq: float = 0.0       # sum of squared (GGUF - source) over re-quantized quantized Linears
    ref_sq: float = 0.0       # sum of squared source weights over the same
    max_abs: float = 0.0

    @property
    def rel_rmse(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0

    def add_error(self, ref: Tensor, data: np.ndarray, qtype: GGMLQuantizationType) -> None:
        back = torch.from_numpy(dequantize_rows(data, qtype, ref.shape[-1])).reshape(ref.shape)
        diff = back - ref.float()
        self.err_sq += float((diff.double() ** 2).sum())
        self.ref_sq += float((ref.double() ** 2).sum())
        self.max_abs = max(self.max_abs, float(diff.abs().max()))


def encode_weight(w: Tensor | QuantizedWeight, qtype: GGMLQuantizationType, name: str,
                  stats: EncodeStats, qw: np.ndarray | None = None) -> np.ndarray:
    """A Linear's weight (float, or a quantized grid) as the array the GGUF writer stores, recording exactness.

    `qw`: importance per input column, used wherever the weight is (re-)quantized."""
    if isinstance(w, QuantizedWeight):
        if qtype in (Q.F32, Q.F16, Q.BF16):
            return encode_float(w.dequantize(torch.float32), qtype)
        data = grid_blocks(w, qtype)
        if data is not None:
            stats.exact.append(name)
            return data
        reason = "act-order g_idx" if not w.trivial_g_idx else f"{'sym' if w.sym else 'asym'} {w.bits}-bit grid"
        stats.requantized[name] = reason
        ref = w.dequantize(torch.float32)
        data = encode_float(ref, qtype, qw)
        stats.add_error(ref, data, qtype)
        return data
    return encode_float(w, qtype, qw)


def write_gguf(writer) -> None:
    """Header, key/values, then tensors (streamed by the lazy writer), and close: a GGUFWriter's full write."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
