"""One entry point for every GGUF block encoder quantkit writes: rows of floats -> the bytes llama.cpp reads.

    quantize_rows(x (rows, n) float32, qtype, qw (n,) or None) -> (rows, n / block * block bytes) uint8
    dequantize_rows(data (rows, bytes), qtype, n)              -> (rows, n) float32

K types and IQ4 use quantkit's encoders (kquants, iquants); the legacy types use the gguf
package's reference quantizers, or quantkit's importance-weighted ones when `qw` is given.
`qw` is llama.cpp's quant_weights: one importance per input column (the imatrix's mean x**2),
the same for every row.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from quantkit.convert import iquants, kquants

Q = GGMLQuantizationType
Encoder = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
ENCODERS: dict[GGMLQuantizationType, tuple[Encoder, Callable[[np.ndarray], np.ndarray]]] = {
    Q.Q2_K: (kquants.encode_q2_k, kquants.decode_q2_k),
    Q.Q3_K: (kquants.encode_q3_k, kquants.decode_q3_k),
    Q.Q4_K: (kquants.encode_q4_k, kquants.decode_q4_k),
    Q.Q5_K: (kquants.encode_q5_k, kquants.decode_q5_k),
    Q.Q6_K: (kquants.encode_q6_k, kquants.decode_q6_k),
    Q.IQ4_NL: (iquants.encode_iq4_nl, iquants.decode_iq4_nl),
    Q.IQ4_XS: (iquants.encode_iq4_xs, iquants.decode_iq4_xs),
}
WEIGHTED_LEGACY = {Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q5_0: "q5_0", Q.Q5_1: "q5_1"}
BLOCK_TYPES = frozenset(ENCODERS) | frozenset(WEIGHTED_LEGACY) | {Q.Q8_0}


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def quantize_rows(x: np.ndarray, qtype: GGMLQuantizationType, qw: np.ndarray | None = None) -> np.ndarray:
    """(rows, n) float32 in `qtype`, rounded as llama-quantize rounds (with `qw`: as it does with an imatrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    blk = block_size(qtype)
    if n % blk:
        raise ValueError(f"rows of {n} do not split into {qtype.name} blocks of {blk}")
    if qw is not None:
        qw = np.ascontiguousarray(qw, dtype=np.float32).reshape(n)
    if qtype in ENCODERS:
        enc = ENCODERS[qtype][0]
        w = None if qw is None else np.broadcast_to(qw.reshape(1, n // blk, blk), (rows, n // blk, blk)).reshape(-1, blk)
        return enc(x.reshape(-1, blk), w).reshape(rows, -1)
    if qw is not None and qtype in WEIGHTED_LEGACY:
        return iquants.encode_legacy_weighted(x, qw, WEIGHTED_LEGACY[qtype])
    return gq.quantize(x, qtype)


def dequantize_rows(data: np.ndarray, qtype: GGMLQuantizationType, n: int) -> np.ndarray:
    """quantkit's own decoders for its encoders' types, the gguf package's for the rest: (rows, n) float32."""
    if qtype in ENCODERS:
        return ENCODERS[qtype][1](np.ascontiguousarray(data)).reshape(-1, n)
    return gq.dequantize(np.ascontiguousarray(data), qtype).reshape(-1, n).astype(np.float32)
