"""GPTQ error feedback on the GGUF grid: the block grid apart from its codes (quantkit.convert.ggml_grid), the
column loop onto it (quantkit.methods.gptq.grid), and `quantize --method gptq --format gguf --type MIX`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGMLQuantizationType
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.convert.ggml_grid import GRID_TYPES, LEVELS, BlockCodec, encode_on_grid, grid_of
from quantkit.convert.gguf_quant import dequantize_rows
from quantkit.methods.gptq.algorithm import group_aware_order, inverse_cholesky
from quantkit.methods.gptq.grid import gptq_on_grid

Q = GGMLQuantizationType
runner = CliRunner()
ALL = sorted(GRID_TYPES, key=lambda t: t.value)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_grid_packs_codes_that_decode_to_its_values(qtype):
    rng = np.random.default_rng(qtype.value)
    codec = BlockCodec(qtype)
    x = (rng.standard_normal((48, codec.block)) * 0.05).astype(np.float32)
    grid = codec.fit(x, rng.random(codec.block).astype(np.float32))
    idx = rng.integers(0, len(LEVELS[qtype]), size=x.shape)
    data = grid.pack(idx)
    vals = grid.values(slice(None), idx)
    assert np.array_equal(dequantize_rows(data, qtype, codec.block), vals)   # bit for bit, the decoder's arithmetic
    scale, offset = grid_of(data, qtype)                                     # the header is the search's
    assert np.array_equal(scale, grid.scale) and (offset is None or np.array_equal(offset, grid.offset))
    back, again = grid.round(slice(None), vals)
    assert (grid.scale != 0).all() and np.array_equal(back, idx) and np.array_equal(again, vals)
    own = dequantize_rows(grid.data, qtype, codec.block)                     # the encoder's own block, re-rounded
    assert np.array_equal(dequantize_rows(grid.pack(grid.round(slice(None), own)[0]), qtype, codec.block), own)


def test_nearest_point_of_the_grid():
    codec = BlockCodec(Q.IQ4_NL)
    grid = codec.fit(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), np.ones(32, np.float32))
    x = np.random.default_rng(0).uniform(-1.2, 1.2, (2,)).astype(np.float32)
    _, v = grid.round(5, x)
    every = np.stack([grid.values(5, np.full(2, i)) for i in range(16)], axis=1)   # (2, 16): every grid point
    assert np.allclose(np.abs(v - x), np.abs(every - x[:, None]).min(axis=1))


def _problem(out_f: int, in_f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    x = torch.randn(2048, in_f, generator=g) @ mix * torch.linspace(0.2, 3, in_f)   # correlated, uneven inputs
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, h


def _out_err(w, q, h):
    d = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0, Q.IQ4_XS, Q.Q6_K, Q.Q3_K], ids=lambda t: t.name)
def test_error_feedback_onto_the_grid(qtype):
    w, h = _problem(32, 512)
    upper, _ = inverse_cholesky(h, 0.01)
    codec, imp = BlockCodec(qtype), (h.diagonal() / 2).numpy()
    res = gptq_on_grid(w, upper, codec, imp)
    # the bytes decode to the values the model computes with, and re-encoding them on their grid gives the bytes
    assert np.array_equal(dequantize_rows(res.data, qtype, 512), res.values.numpy())
    assert np.array_equal(encode_on_grid(res.values.numpy(), res.data, qtype), res.data)
    # without feedback (identity factor) it is the weighted search and nearest rounding, block by block
    plain = gptq_on_grid(w, torch.eye(512), codec, imp)
    assert _out_err(w, res.values, h) < 0.9 * _out_err(w, plain.values, h)
    assert res.data.shape == plain.data.shape and res.data.dtype == np.uint8
    # group-aware order (whole blocks by their largest H diagonal): natural-order bytes, on their grid, better
    order = group_aware_order(h.diagonal(), codec.block)
    gar = gptq_on_grid(w, inverse_cholesky(h[order][:, order], 0.01)[0], codec, imp, order=order)
    assert not torch.equal(order, torch.arange(512))
    assert np.array_equal(dequantize_rows(gar.data, qtype, 512), gar.values.numpy())
    assert np.array_equal(encode_on_grid(gar.values.numpy(), gar.data, qtype), gar.data)
    assert _out_err(w, gar.values, h) < 0.9 * _out_err(w, res.values, h)


def test_error_feedback_is_deterministic_and_leaves_inputs():
    w, h = _problem(16, 256, seed=1)
    w0 = w.clone()
    upper, _ = inverse_cholesky(h, 0.01)
    a = gptq_on_grid(w, upper, BlockCodec(Q.Q4_K), (h.diagonal() / 2).numpy(), block_size=64)
    b = gptq_on_grid(w, upper, BlockCodec(Q.Q4_K), (h.diagonal() / 2).numpy(), block_size=256)
    assert torch.equal(w, w0)
    assert a.data.tobytes() == b.data.tobytes()  # lazy batches hold whole super-blocks: the same result


def _quantize(model, out, text_file, *extra):
    return runner.invoke(app, ["quantize", str(model), "--method", "gptq", "--out", str(out), "--format", "gguf",
                               "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
                               "--quiet", *extra])


def test_cli_writes_the_mix_deterministically(wide, text_file, tmp_path):
    from quantkit.convert.gguf_export import export_gguf

    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    r = _quantize(wide, a, text_file, "--type", "q4_k_m", "--json", "-")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["format"] == "gguf" and summary["grid_rounded"] == 15 and summary["size_bytes"] == a.stat().st_size
    assert _quantize(wide, b, text_file, "--type", "q4_k_m").exit_code == 0
    assert a.read_bytes() == b.read_bytes()                         # same seed, same bytes
    # the same tensor types and byte sizes as the calibrated export (llama.cpp's with-imatrix mix rules)
    ref = tmp_path / "ref.gguf"
    export_gguf(wide, ref, "q4_k_m", importance={})
    got = {t.name: t for t in GGUFReader(str(a)).tensors}
    want = {t.name: t for t in GGUFReader(str(ref)).tensors}
    assert {n: (t.tensor_type, t.n_bytes) for n, t in got.items()} == {n: (t.tensor_type, t.n_bytes) for n, t in want.items()}
    assert {t.tensor_type for t in got.values()} >= {Q.Q4_K, Q.Q6_K}
    # the tied head/embedding: GPTQ-rounded by default (--opt head=gptq, quantkit.methods.gptq.head), on its grid
    emb = np.asarray(got["token_embd.weight"].data)
    assert not np.array_equal(emb, np.asarray(want["token_embd.weight"].data))
    dec = dequantize_rows(emb, got["token_embd.weight"].tensor_type, int(got["token_embd.weight"].shape[0]))
    assert np.array_equal(encode_on_grid(dec, emb, got["token_embd.weight"].tensor_type), emb)
    # every block Linear: codes on its own grid (re-encoding the decoded weights gives the file's bytes), and
    # different from the weighted search alone (the error feedback moved them)
    moved = 0
    for name, t in got.items():
        if t.tensor_type in (Q.F32, Q.F16) or not name.startswith("blk."):
            continue
        n = int(t.shape[0])
        data = np.asarray(t.data)
        dec = dequantize_rows(data, t.tensor_type, n)
        assert np.array_equal(encode_on_grid(dec, data, t.tensor_type), data), name
        moved += not np.array_equal(data, np.asarray(want[name].data))
    assert moved >= 10
    prov = json.loads((tmp_path / "a.gguf.quantkit_provenance.json").read_text())
    assert prov["method"] == "gptq" and prov["target"] == "gguf q4_k_m" and prov["calibrated"]
    # the file itself carries only what made it (the sidecar has the calibration): no larger than a llama.cpp file
    embedded = json.loads(str(bytes(GGUFReader(tmp_path / "a.gguf").fields["quantkit.provenance"].parts[-1]), "utf-8"))
    assert embedded == {"method": "gptq", "quantkit_version": prov["quantkit_version"], "target": "gguf q4_k_m"}


def test_cli_legacy_fallback_types(tiny_llama, text_file, tmp_path):
    out = tmp_path / "l.gguf"
    r = _quantize(tiny_llama, out, text_file, "--type", "q4_0", "--json", "-")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["tensor_types"] == {"F32": 5, "Q4_0": 14, "Q8_0": 1} and summary["grid_rounded"] == 15  # + the head
    for t in GGUFReader(str(out)).tensors:
        if t.tensor_type == Q.Q4_0:  # widths 64 and 128: legacy 32-blocks, each on its own grid
            data = np.asarray(t.data)
            dec = dequantize_rows(data, Q.Q4_0, int(t.shape[0]))
            assert np.array_equal(encode_on_grid(dec, data, Q.Q4_0), data), t.name


@pytest.mark.parametrize("args, words", [
    (["--method", "rtn", "--format", "gguf"], "needs a method that rounds onto GGUF's grid (gptq"),
    (["--method", "gptq", "--format", "gguf", "--bits", "4"], "do not apply with --format gguf"),
    (["--method", "gptq", "--format", "gguf", "--type", "f16"], "quantized --type"),
    (["--method", "gptq", "--format", "gguf", "--type", "q4_k_x"], "quantized --type"),
    (["--method", "gptq", "--type", "q4_k_m"], "go with --format gguf"),
    (["--method", "gptq", "--format", "gguf", "--desc-act"], "--desc-act does not apply"),
])
def test_cli_bad_input_is_one_line(tiny_llama, text_file, tmp_path, args, words):
    r = runner.invoke(app, ["quantize", str(tiny_llama), "--out", str(tmp_path / "x.gguf"), *args, "--dataset",
                            str(text_file), "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--quiet"])
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.gguf").exists()


def test_cli_gguf_output_name_and_existing_file(tiny_llama, text_file, tmp_path):
    bad = runner.invoke(app, ["quantize", str(tiny_llama), "--method", "gptq", "--out", str(tmp_path / "x"),
                              "--format", "gguf"])
    assert bad.exit_code == 2 and "must end in .gguf" in bad.output
    (tmp_path / "y.gguf").write_bytes(b"keep")
    r = _quantize(tiny_llama, tmp_path / "y.gguf", text_file)
    assert r.exit_code == 2 and "--force" in r.output and (tmp_path / "y.gguf").read_bytes() == b"keep"
