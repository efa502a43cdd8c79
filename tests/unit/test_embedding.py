"""`quantize --embedding int8|int4`: the token embedding stored quantized in compressed-tensors (an `Embedding`
config group), read back by quantkit.load (lookup and tied logits on the stored grid), counted by the stats,
byte-identical across runs, and refused where the format cannot hold it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import quantkit
from quantkit.api import quantize
from quantkit.cli.main import app
from quantkit.errors import CheckpointError
from quantkit.formats.stats import checkpoint_stats
from quantkit.grid import quantize_weight
from tests.tiny import assert_quantize_refused, llama_config, make_model

W4 = {"bits": 4, "group_size": 32, "sym": True}
IDS = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))


def _quantize(model, out, embedding, method="rtn", **scheme):
    quantize(model, method, out, scheme={**W4, **scheme, "embedding": embedding}, device="cpu",
             fmt="compressed-tensors", calib={"dataset": "wiki-vital", "nsamples": 4, "seqlen": 32, "batch_size": 4})
    return out


def _keys(out):
    with safe_open(out / "model.safetensors", "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _expected(base_folder, bits, group_size, sym):
    """The base embedding on the grid, dequantized: what the checkpoint must hold."""
    base = quantkit.load(base_folder)
    return quantize_weight(base.model.embed_tokens.weight, bits, group_size, sym).dequantize(torch.float32)


@pytest.fixture(scope="module")
def outs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    return {e: _quantize(tiny_llama, root / str(e), e) for e in (None, "int8", "int4")}


@pytest.mark.parametrize("embedding, grid", [("int8", (8, -1, True)), ("int4", (4, 32, True))])
def test_tied_model_round_trip(tiny_llama, outs, embedding, grid):
    out = outs[embedding]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_1"]
    assert group["targets"] == ["Embedding"] and group["format"] == "pack-quantized"
    assert group["weights"]["num_bits"] == grid[0] and group["weights"]["strategy"] == ("channel" if grid[1] == -1 else "group")
    keys = _keys(out)
    assert keys["model.embed_tokens.weight_packed"] == (320, 64 * grid[0] // 32)
    assert "model.embed_tokens.weight" not in keys and "lm_head.weight" not in keys  # tied: stored once, quantized
    model = quantkit.load(out).eval()
    want = _expected(tiny_llama, *grid)
    emb = model.model.embed_tokens.weight
    assert torch.equal(emb, want)
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()
    with torch.no_grad():  # the lookup and the logits both use the stored grid
        assert torch.equal(model.model.embed_tokens(IDS), want[IDS])
        hidden = model.model(IDS).last_hidden_state
        assert torch.allclose(model(IDS).logits, hidden @ want.T, atol=1e-5, rtol=1e-5)
    # the Linears are untouched by the option: same codes as without it
    plain = quantkit.load(outs[None])
    assert torch.equal(plain.model.layers[0].mlp.up_proj.dequantize(torch.float32),
                       model.model.layers[0].mlp.up_proj.dequantize(torch.float32))
    assert not torch.equal(plain.model.embed_tokens.weight, emb)


def test_stats_count_every_weight_once(outs):
    fp16, int8, int4 = (checkpoint_stats(outs[e]) for e in (None, "int8", "int4"))
    assert fp16["embedding_bits_per_weight"] is None
    assert fp16["total_params"] == int8["total_params"] == int4["total_params"]
    assert fp16["bits_per_weight"] == int8["bits_per_weight"] == int4["bits_per_weight"]  # the Linears only
    assert fp16["quantized_modules"] == int8["quantized_modules"] == 14
    # int8 per row: 8 bits + an fp16 scale per 64 weights (+ the 2 x int64 weight_shape); int4 g32: 4 + 16/32
    n = 320 * 64
    assert int8["embedding_bits_per_weight"] == pytest.approx(8 + 16 / 64 + 128 / n)
    assert int4["embedding_bits_per_weight"] == pytest.approx(4 + 16 / 32 + 128 / n)
    assert fp16["bits_per_weight_all"] > int8["bits_per_weight_all"] > int4["bits_per_weight_all"]
    saved = (fp16["bits_per_weight_all"] - int8["bits_per_weight_all"]) * fp16["total_params"]
    assert saved == pytest.approx(n * (16 - int8["embedding_bits_per_weight"]))


def test_same_seed_same_bytes(tiny_llama, outs, tmp_path):
    again = _quantize(tiny_llama, tmp_path / "again", "int4")
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (outs["int4"] / name).read_bytes()


def test_untied_head_stays_float(tmp_path):
    config = llama_config()
    config.tie_word_embeddings = False
    base = make_model(tmp_path / "untied", config)
    out = _quantize(base, tmp_path / "q", "int8")
    keys = _keys(out)
    assert "lm_head.weight" in keys and "model.embed_tokens.weight_packed" in keys
    model, ref = quantkit.load(out), quantkit.load(base)
    assert torch.equal(model.model.embed_tokens.weight, _expected(base, 8, -1, True))
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight.half().float())


def test_asymmetric_int4_and_gptq(tiny_llama, tmp_path):
    """int4 follows the scheme's grid (asymmetric: packed zero points), and a calibrated method writes it too."""
    out = _quantize(tiny_llama, tmp_path / "g", "int4", method="gptq", sym=False)
    assert _keys(out)["model.embed_tokens.weight_zero_point"] == (320 * 4 // 32, 2)
    assert torch.equal(quantkit.load(out).model.embed_tokens.weight, _expected(tiny_llama, 4, 32, False))


def test_groups_in_any_order(outs, tmp_path):
    """A config with the Embedding group first (as another writer may order them) reads the same."""
    import shutil

    out = tmp_path / "swapped"
    shutil.copytree(outs["int8"], out)
    config = json.loads((out / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    config["quantization_config"]["config_groups"] = {"embedding": groups["group_1"], "linears": groups["group_0"]}
    (out / "config.json").write_text(json.dumps(config))
    a, b = quantkit.load(out), quantkit.load(outs["int8"])
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)
    assert checkpoint_stats(out)["bits_per_weight_all"] == checkpoint_stats(outs["int8"])["bits_per_weight_all"]


def test_format_option_writes_the_same_codes(tiny_llama, outs, tmp_path):
    """--format compressed-tensors without --embedding: the GPTQ-format run's weights, in pack-quantized."""
    gptq = tmp_path / "gptq"
    quantize(tiny_llama, "rtn", gptq, scheme=W4, device="cpu")
    a, b = quantkit.load(gptq), quantkit.load(outs[None])
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)


@pytest.mark.parametrize("args, needle", [
    (["--embedding", "int8"], "gptq checkpoints cannot hold a quantized embedding; add --format compressed-tensors"),
    (["--embedding", "int8", "--method", "awq"], "awq checkpoints cannot hold a quantized embedding"),
    (["--embedding", "int8", "--format", "gguf", "--method", "gptq"], "--embedding does not apply with --format gguf"),
    (["--embedding", "int2", "--format", "compressed-tensors"], "use int8 or int4"),
    (["--embedding", "int8", "--preset", "w8a8"], "weight-only integer schemes"),
    (["--format", "awq"], "--format awq: rtn writes gptq, compressed-tensors"),
])
def test_refusals(tiny_llama, tmp_path, args, needle):
    assert_quantize_refused(tiny_llama, tmp_path / ("o.gguf" if "gguf" in args else "o"), args, needle)


def test_refuses_rows_that_do_not_pack(tmp_path):
    base = make_model(tmp_path / "v324", llama_config(vocab=324))  # 324 asymmetric 4-bit zero points: not whole int32s
    assert_quantize_refused(base, tmp_path / "o", ["--embedding", "int4", "--asym", "--bits", "4", "--group-size", "32",
                                                   "--format", "compressed-tensors"], "do not pack into int32")


def test_convert_refuses_a_quantized_embedding(outs, tmp_path):
    from quantkit.convert import convert

    with pytest.raises(CheckpointError, match="token embedding is stored quantized"):
        convert(outs["int8"], "gptq", tmp_path / "g")
    r = CliRunner().invoke(app, ["info", str(outs["int8"]), "--json", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout)["embedding_bits_per_weight"] > 8


def test_a_job_without_the_format_is_refused(tiny_llama):
    """The library path (make_job + the method, no api.quantize) refuses too, rather than writing a GPTQ file."""
    from quantkit.api import make_job
    from quantkit.errors import SchemeError

    impl, job = make_job(tiny_llama, "rtn", scheme={**W4, "embedding": "int8"}, device="cpu")
    with pytest.raises(SchemeError, match="gptq checkpoints cannot hold a quantized embedding"):
        impl.quantize(job)
    job.fmt = "compressed-tensors"
    assert set(impl.quantize(job).embeddings) == {"model.embed_tokens"}
