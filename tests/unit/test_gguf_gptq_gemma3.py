"""`quantize --method gptq --format gguf` on a tiny Gemma 3: the mix's types and sizes, Gemma's tensors (1 + w norms,
the tied embedding) as `convert --to gguf` writes them, every block Linear on its grid and moved by the feedback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.convert.ggml_grid import encode_on_grid
from quantkit.convert.gguf_quant import dequantize_rows

Q = GGMLQuantizationType
runner = CliRunner()


@pytest.fixture(scope="module", params=[256, 320], ids=["k-types", "fallbacks"])
def gemma(request, tmp_path_factory):
    """hidden 256: rows split into K super-blocks; hidden 320 (as gemma3-270m's 640): the legacy fallbacks."""
    from tests.tiny import gemma3_config, make_gemma3

    h = request.param
    return make_gemma3(tmp_path_factory.mktemp(f"gemma{h}") / "g", gemma3_config(hidden=h, inter=2 * h)), h


def _quantize(model, out, text_file, *extra):
    return runner.invoke(app, ["quantize", str(model), "--method", "gptq", "--out", str(out), "--format", "gguf",
                               "--type", "q3_k_m", "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "32",
                               "--device", "cpu", "--quiet", *extra])


def test_gptq_on_the_grid_writes_gemma3(gemma, text_file, tmp_path):
    from quantkit.convert.gguf_export import export_gguf

    gemma, hidden = gemma
    a, b, ref = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "ref.gguf"
    r = _quantize(gemma, a, text_file, "--json", "-")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["grid_rounded"] == 3 * 7 and summary["size_bytes"] == a.stat().st_size
    assert _quantize(gemma, b, text_file).exit_code == 0
    assert a.read_bytes() == b.read_bytes()                             # same seed, same bytes
    export_gguf(gemma, ref, "q3_k_m", importance={})                    # llama.cpp's with-imatrix mix rules
    reader = GGUFReader(str(a))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "gemma3"
    got = {t.name: t for t in reader.tensors}
    want = {t.name: t for t in GGUFReader(str(ref)).tensors}
    assert {n: (t.tensor_type, t.n_bytes) for n, t in got.items()} == {n: (t.tensor_type, t.n_bytes) for n, t in want.items()}
    assert "output.weight" not in got                                   # tied: llama.cpp reads token_embd
    kinds = {t.tensor_type for n, t in got.items() if n.startswith("blk.") and t.tensor_type != Q.F32}
    assert kinds >= ({Q.Q3_K, Q.Q4_K} if hidden == 256 else {Q.Q4_0, Q.Q5_0})
    moved = 0
    for name, t in got.items():
        data = np.asarray(t.data)
        if t.tensor_type == Q.F32 or not name.startswith("blk."):
            # norms (stored as 1 + w) and the embedding: exactly what `convert --to gguf` writes
            assert np.array_equal(data, np.asarray(want[name].data)), name
            continue
        dec = dequantize_rows(data, t.tensor_type, int(t.shape[0]))
        assert np.array_equal(encode_on_grid(dec, data, t.tensor_type), data), name
        moved += not np.array_equal(data, np.asarray(want[name].data))
    assert moved >= 15                                                  # the error feedback moved the codes
    norms = [n for n in got if n.endswith("norm.weight")]
    assert len(norms) == 3 * 6 + 1                                      # 4 block norms + q/k norms, and the final
