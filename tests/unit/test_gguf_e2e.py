"""The end-to-end stage onto GGUF's grids (`quantize --method gptq --format gguf --opt e2e_steps=N`): each block's
float16 scale and min tuned with the norms against the float model's logits, codes and sub-scales kept
(`quantkit.methods.e2e.headers`, `BlockCodec.parts` / `scales` / `with_scales`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGMLQuantizationType
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.convert.ggml_grid import GRID_TYPES, BlockCodec
from quantkit.convert.gguf_quant import dequantize_rows, quantize_rows
from quantkit.methods.e2e.headers import HeaderParts

Q = GGMLQuantizationType
runner = CliRunner()


@pytest.mark.parametrize("qtype", sorted(GRID_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
def test_a_block_is_linear_in_its_float_header(qtype):
    rng = np.random.default_rng(qtype.value)
    codec, n = BlockCodec(qtype), 512
    data = quantize_rows((rng.standard_normal((6, n)) * 0.05).astype(np.float32), qtype)
    d, m = codec.scales(data)
    a, b = codec.parts(data, n)
    assert d.shape == (6, n // codec.block) and (m is None) == (b is None)
    parts = HeaderParts(*(None if v is None else torch.from_numpy(v) for v in (a, b, d, m)))
    assert np.array_equal(parts.weight().numpy(), dequantize_rows(data, qtype, n))   # bit for bit
    assert np.array_equal(codec.with_scales(data, d, m), data)
    # new header values: the decoder reads them, and nothing else of the blocks moved
    d2 = (d * rng.uniform(0.8, 1.2, d.shape)).astype(np.float16).astype(np.float32)
    m2 = None if m is None else (m * rng.uniform(0.8, 1.2, m.shape)).astype(np.float16).astype(np.float32)
    moved = codec.with_scales(data, d2, m2)
    want = HeaderParts(parts.a, parts.b, torch.from_numpy(d2), None if m2 is None else torch.from_numpy(m2))
    assert np.array_equal(dequantize_rows(moved, qtype, n), want.weight().numpy())
    assert np.array_equal(codec.parts(moved, n)[0], a)


def _quantize(model, out, text_file, *extra):
    return runner.invoke(app, ["quantize", str(model), "--method", "gptq", "--out", str(out), "--format", "gguf",
                               "--type", "q4_k_m", "--dataset", str(text_file), "--nsamples", "8", "--seqlen", "32",
                               "--device", "cpu", "--quiet", *extra])


def _kl_on_calibration(base_dir, gguf, text_file) -> float:
    """Mean KL(base || file) on the calibration windows the stage tuned on (a tiny random model's gain does not
    carry to other windows; the benchmarks measure that on real models), the file read back by transformers."""
    from quantkit.calib.data import calibration_samples
    from quantkit.models.sources import _load_gguf, load_model, resolve

    base, tok = load_model(resolve(str(base_dir)), torch.float32)
    model, _ = _load_gguf(gguf, torch.float32)
    ids = calibration_samples(tok, str(text_file), 8, 32, 0)
    with torch.no_grad():
        p = torch.log_softmax(base(ids).logits.float(), -1)
        q = torch.log_softmax(model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _codes_only(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Each quantized tensor's bytes with its float headers zeroed: the codes and integer sub-scales."""
    out = {}
    for t in reader.tensors:
        if t.tensor_type in GRID_TYPES:
            data = np.asarray(t.data)
            codec = BlockCodec(t.tensor_type)
            d, m = codec.scales(data)
            out[t.name] = codec.with_scales(data, np.zeros_like(d), None if m is None else np.zeros_like(m))
    return out


def test_cli_tunes_headers_and_norms_only(wide, text_file, tmp_path):
    plain, tuned, again = tmp_path / "p.gguf", tmp_path / "t.gguf", tmp_path / "a.gguf"
    assert _quantize(wide, plain, text_file).exit_code == 0
    # a random tiny model is far from its float self at 4 bits: it takes the integer grids' step (the default onto
    # GGUF, 3e-5, is for real models' nearly lossless files; test_gguf_stage_default_step below)
    r = _quantize(wide, tuned, text_file, "--opt", "e2e_steps=12", "--opt", "e2e_lr=1e-3", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["options"]["e2e_steps"] == 12
    assert _quantize(wide, again, text_file, "--opt", "e2e_steps=12", "--opt", "e2e_lr=1e-3").exit_code == 0
    assert tuned.read_bytes() == again.read_bytes()                    # same seed, same bytes
    a, b = GGUFReader(str(plain)), GGUFReader(str(tuned))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert {n: (t.tensor_type, t.n_bytes) for n, t in ta.items()} == {n: (t.tensor_type, t.n_bytes) for n, t in tb.items()}
    ca, cb = _codes_only(a), _codes_only(b)
    assert ca.keys() == cb.keys() and all(np.array_equal(ca[n], cb[n]) for n in ca)   # codes and sub-scales kept
    headers = [n for n in ta if n.startswith("blk.") and n in ca
               and not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    norms = [n for n in ta if n.endswith("norm.weight")
             and not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    assert len(headers) >= 10 and len(norms) >= 4                       # the blocks' scales and the norms moved
    assert np.array_equal(np.asarray(ta["token_embd.weight"].data), np.asarray(tb["token_embd.weight"].data))
    assert _kl_on_calibration(wide, tuned, text_file) < 0.8 * _kl_on_calibration(wide, plain, text_file)
    prov = json.loads((tmp_path / "t.gguf.quantkit_provenance.json").read_text())
    assert prov["options"]["e2e_steps"] == 12


@pytest.mark.parametrize("opt", ["e2e_rounding_lr=0.01", "e2e_embedding_lr=1e-4"])
def test_cli_gguf_stage_refuses_what_it_cannot_store(tiny_llama, text_file, tmp_path, opt):
    out = tmp_path / "x.gguf"
    r = _quantize(tiny_llama, out, text_file, "--opt", "e2e_steps=2", "--opt", opt)
    assert r.exit_code == 2 and "block scales and norms only" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_gguf_stage_default_step(wide, text_file, tmp_path, caplog):
    """Onto GGUF the stage's default step is HEADER_LR, recorded as resolved; 1e-4 and up is warned about."""
    from quantkit.api import quantize
    from quantkit.methods.e2e.stage import GRID_LR, HEADER_LR

    # before any CLI run in this test: the CLI's logging set-up replaces the root handlers (caplog's among them)
    with caplog.at_level("WARNING", logger="quantkit.methods.e2e.stage"):
        quantize(wide, "gptq", tmp_path / "w.gguf", fmt="gguf", gguf_type="q4_k_m", device="cpu",
                 options={"e2e_steps": 2, "e2e_lr": 1e-3},
                 calib={"dataset": str(text_file), "nsamples": 8, "seqlen": 32, "seed": 0})
    assert any("raised the KL" in r.getMessage() for r in caplog.records)
    prov = json.loads((tmp_path / "w.gguf.quantkit_provenance.json").read_text())
    assert prov["options"]["e2e_lr"] == 1e-3
    out = tmp_path / "d.gguf"
    assert _quantize(wide, out, text_file, "--opt", "e2e_steps=2").exit_code == 0
    prov = json.loads((tmp_path / "d.gguf.quantkit_provenance.json").read_text())
    assert prov["options"]["e2e_lr"] == HEADER_LR < GRID_LR
