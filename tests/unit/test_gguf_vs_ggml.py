"""quantkit's encoders against ggml's own (ggml_quantize_chunk, what llama-quantize runs), on the same rows.

Needs .llamacpp/bin/ggml-ref-quant (`make llamacpp-tools`); skipped without it. The two compute in
float32 in the same order, but the C compiler may fuse a multiply-add, which can flip a rare tie in
a scale search: so the test asks for nearly every block identical and the same error to a tiny
tolerance, rather than every byte.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.convert.gguf_quant import ENCODERS, WEIGHTED_LEGACY, dequantize_rows, quantize_rows

Q = GGMLQuantizationType
REF = Path(__file__).resolve().parents[2] / ".llamacpp" / "bin" / "ggml-ref-quant"
SMOLLM2 = Path.home() / ".cache/quantkit/models/smollm2-135m/model.safetensors"
pytestmark = pytest.mark.skipif(not REF.is_file(), reason="ggml-ref-quant not built (make llamacpp-tools)")


def ggml_quantize(x: np.ndarray, qtype: GGMLQuantizationType, qw: np.ndarray | None, tmp: Path) -> np.ndarray:
    rows, cols = x.shape
    src, dst, imat = tmp / "x.f32", tmp / "y.bin", tmp / "w.f32"
    x.astype("<f4").tofile(src)
    cmd = [str(REF), str(int(qtype)), str(rows), str(cols), str(src), str(dst)]
    if qw is not None:
        qw.astype("<f4").tofile(imat)
        cmd.append(str(imat))
    subprocess.run(cmd, check=True, capture_output=True)
    return np.fromfile(dst, np.uint8).reshape(rows, -1)


def rows_of(kind: str) -> np.ndarray:
    if kind == "random":
        rng = np.random.default_rng(11)
        x = (rng.standard_normal((64, 1536)) * 0.02).astype(np.float32)
        x[3, 100:140] *= 30
        return x
    if not SMOLLM2.is_file():
        pytest.skip("smollm2-135m is not cached")
    from safetensors import safe_open

    with safe_open(str(SMOLLM2), "np") as f:
        return f.get_slice("model.layers.7.mlp.down_proj.weight")[:64].astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "smollm2"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", list(ENCODERS) + list(WEIGHTED_LEGACY), ids=lambda t: t.name)
def test_encoder_matches_ggml(qtype, weighted, kind, tmp_path):
    if qtype in WEIGHTED_LEGACY and not weighted:
        pytest.skip("unweighted legacy types are the gguf package's reference quantizers")
    x = rows_of(kind)
    qw = (np.random.default_rng(5).random(x.shape[1], dtype=np.float32) + 0.05) if weighted else None
    mine = quantize_rows(x, qtype, qw)
    theirs = ggml_quantize(x, qtype, qw, tmp_path)
    assert mine.shape == theirs.shape
    size = GGML_QUANT_SIZES[qtype][1]
    same_blocks = (mine.reshape(-1, size) == theirs.reshape(-1, size)).all(axis=1).mean()
    assert same_blocks >= 0.99, f"{same_blocks:.4f} of the blocks are identical"
    err = [float(((dequantize_rows(d, qtype, x.shape[1]) - x) ** 2).sum()) for d in (mine, theirs)]
    assert err[0] == pytest.approx(err[1], rel=1e-3)
