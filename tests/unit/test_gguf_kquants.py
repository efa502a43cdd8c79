"""K-quant / IQ4 encoders: every type round-trips through the gguf package's decoder bit for bit, rounds as
the format promises, and the importance-weighted search lowers the weighted error it minimises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from quantkit.convert.gguf_quant import ENCODERS, WEIGHTED_LEGACY, dequantize_rows, quantize_rows

Q = GGMLQuantizationType
TYPES = list(ENCODERS)
# relative RMS error on Gaussian weights that each type stays under (its bits per weight sets it)
REL_RMSE = {Q.Q2_K: 0.35, Q.Q3_K: 0.2, Q.Q4_K: 0.1, Q.Q5_K: 0.05, Q.Q6_K: 0.025, Q.IQ4_NL: 0.1, Q.IQ4_XS: 0.1}
SMOLLM2 = Path.home() / ".cache/quantkit/models/smollm2-135m/model.safetensors"


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    x[0, :40] *= 25  # an outlier run inside one block
    return x


def importance(cols: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random(cols, dtype=np.float32) ** 4 * 10 + 0.01).astype(np.float32)


def rel_rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_round_trip_through_gguf_decoder_is_bit_exact(qtype, weighted):
    x = gaussian(8, 512)
    qw = importance(512) if weighted else None
    data = quantize_rows(x, qtype, qw)
    block, size = GGML_QUANT_SIZES[qtype]
    assert data.shape == (8, 512 // block * size) and data.dtype == np.uint8
    theirs = gq.dequantize(data, qtype).reshape(8, 512)
    mine = dequantize_rows(data, qtype, 512)
    assert np.array_equal(theirs.astype(np.float32), mine)
    assert rel_rmse(mine, x) < REL_RMSE[qtype]


@pytest.mark.skipif(not SMOLLM2.is_file(), reason="smollm2-135m is not cached")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_on_real_weights(qtype):
    from safetensors import safe_open

    with safe_open(str(SMOLLM2), "np") as f:
        w = f.get_slice("model.layers.3.mlp.down_proj.weight")[:32].astype(np.float32)  # (32, 1536)
    data = quantize_rows(w, qtype)
    mine = dequantize_rows(data, qtype, w.shape[1])
    assert np.array_equal(gq.dequantize(data, qtype).reshape(w.shape).astype(np.float32), mine)
    assert rel_rmse(mine, w) < REL_RMSE[qtype]


@pytest.mark.parametrize("qtype", TYPES + list(WEIGHTED_LEGACY), ids=lambda t: t.name)
def test_importance_weighted_search_lowers_the_weighted_error(qtype):
    x = gaussian(32, 512, seed=3)
    qw = importance(512, seed=4)

    def weighted_err(data: np.ndarray) -> float:
        return float((((dequantize_rows(data, qtype, 512) - x) ** 2) * qw).sum())

    assert weighted_err(quantize_rows(x, qtype, qw)) < 0.97 * weighted_err(quantize_rows(x, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_zero_and_constant_blocks(qtype):
    x = np.zeros((2, 256), np.float32)
    x[1] = 0.5
    back = dequantize_rows(quantize_rows(x, qtype), qtype, 256)
    assert np.array_equal(back[0], np.zeros(256, np.float32))
    assert np.abs(back[1] - 0.5).max() < 0.5 * REL_RMSE[qtype] + 0.01


def test_same_input_same_bytes():
    x = gaussian(4, 256, seed=7)
    qw = importance(256)
    for qtype in TYPES:
        assert np.array_equal(quantize_rows(x, qtype, qw), quantize_rows(x.copy(), qtype, qw.copy()))


def test_legacy_without_weights_is_the_reference_quantizer():
    x = gaussian(4, 256)
    for qtype in WEIGHTED_LEGACY:
        assert np.array_equal(quantize_rows(x, qtype), gq.quantize(x, qtype))


def test_rows_that_do_not_split_into_blocks_are_refused():
    with pytest.raises(ValueError, match="do not split"):
        quantize_rows(np.zeros((1, 576), np.float32), Q.Q4_K)
