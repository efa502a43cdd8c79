"""The gptq method as users reach it: registry, options, checkpoint metadata, determinism, non-sequential mode."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

import quantkit
from quantkit.api import quantize
from quantkit.errors import QuantkitError
from quantkit.registry import get_method, list_methods
from tests.tiny import llama_config, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("gptq") / "m", llama_config(hidden=64, inter=128))


def _calib(text_file):
    return {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}


def _job(options):
    from quantkit.methods.base import QuantJob
    from quantkit.models.sources import ModelSource
    from quantkit.scheme import make_scheme

    return QuantJob(source=ModelSource("folder", "unused", "unused"), scheme=make_scheme("w4g128"), options=options)


def test_group_aware_flag_reaches_the_checkpoint_record(tiny, text_file, tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(tiny), "--method", "gptq", "--out", str(out), "--bits", "4",
                                 "--group-size", "32", "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "32",
                                 "--no-act-group-aware", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "quantkit.json").read_text())["options"]["act_group_aware"] is False


def test_registered_with_options():
    m = get_method("gptq")
    assert m.name == "gptq" and m.needs_calibration and m.formats == ("gptq", "compressed-tensors")
    assert any(i.name == "gptq" for i in list_methods())
    o = m.Options()
    assert (o.damp, o.block_size, o.true_sequential, o.offload) == (0.01, 128, True, "none")
    assert o.act_group_aware and m.params(_job(o)).group_aware
    assert not m.params(_job(m.Options(act_group_aware=False))).group_aware
    with pytest.raises(ValidationError):
        m.Options(dampening=0.1)
    with pytest.raises(ValidationError):
        m.Options(offload="ram")


def test_checkpoint_is_deterministic_and_records_options(tiny, text_file, tmp_path):
    opts = {"damp": 0.05, "block_size": 32}
    for name in ("a", "b"):
        quantize(tiny, "gptq", tmp_path / name, scheme={"bits": 4, "group_size": 32, "desc_act": True},
                 calib=_calib(text_file), options=opts, device="cpu")
    for f in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["damp_percent"] == 0.05 and qc["desc_act"] is True and qc["true_sequential"] is True
    prov = json.loads((tmp_path / "a" / "quantkit.json").read_text())
    assert prov["method"] == "gptq" and prov["options"]["block_size"] == 32
    assert len(prov["calibration"]["sha256"]) == 64


def test_non_sequential_mode_and_skip(tiny, text_file, tmp_path):
    quantize(tiny, "gptq", tmp_path / "q", scheme={"bits": 8, "group_size": -1, "skip": ["lm_head", "*embed_tokens*",
                                                                                            "*.k_proj"]},
             calib=_calib(text_file), options={"true_sequential": False}, device="cpu")
    model = quantkit.load(tmp_path / "q")
    assert isinstance(model.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["true_sequential"] is False


def test_needs_a_tokenizer(tmp_path, text_file):
    folder = make_model(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink(missing_ok=True)
    with pytest.raises(QuantkitError, match="tokenizer"):
        quantize(folder, "gptq", tmp_path / "q", scheme="w4g64", calib=_calib(text_file), device="cpu")


def test_bfloat16_calibration_is_deterministic_and_close_to_float32(tiny, text_file, tmp_path):
    """--calib-dtype bfloat16: blocks compute in bf16 while calibrating; codes come from float32 masters,
    the unquantized tensors are the original ones, and the model stays near the float32-calibrated one."""
    from safetensors.torch import load_file

    scheme = {"bits": 4, "group_size": 32}
    for name, dt in (("a", "bfloat16"), ("b", "bfloat16"), ("f", "float32")):
        quantize(tiny, "gptq", tmp_path / name, scheme=scheme, calib=_calib(text_file),
                 options={"calib_dtype": dt}, device="cpu")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    a, f = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "f" / "model.safetensors")
    assert a.keys() == f.keys()
    for k in a:
        assert a[k].dtype == f[k].dtype, k
        if not k.endswith((".qweight", ".qzeros", ".scales")):
            assert torch.equal(a[k], f[k]), k  # norms, embeddings, g_idx: untouched by the bf16 pass
    assert json.loads((tmp_path / "a" / "quantkit.json").read_text())["options"]["calib_dtype"] == "bfloat16"
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lf = (quantkit.load(tmp_path / n)(ids).logits for n in ("a", "f"))
        base = quantkit.load(tiny)(ids).logits
    # the bf16-calibrated model is about as far from the base as the float32-calibrated one
    assert (la - base).norm() < 1.5 * (lf - base).norm()


def test_computing_in_restores_every_tensor():
    from quantkit.calib.pipeline import computing_in

    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    block.register_buffer("table", torch.randn(4), persistent=False)
    before = {k: t.clone() for k, t in [*block.named_parameters(), *block.named_buffers()]}
    with computing_in(block, torch.bfloat16) as masters:
        assert block[0].weight.dtype == torch.bfloat16 and block.table.dtype == torch.bfloat16
        assert torch.equal(masters[block[0]], before["0.weight"])
        block[0].weight.data.zero_()
    for k, t in [*block.named_parameters(), *block.named_buffers()]:
        assert t.dtype == before[k].dtype and torch.equal(t, before[k]), k
    assert isinstance(block[0].weight, torch.nn.Parameter)


def test_computing_in_keeps_the_originals_and_copies_only_what_it_would_share():
    from quantkit.calib.pipeline import computing_in

    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16))
    fp32_storage = block[0].weight.data_ptr()
    before = {k: t.clone() for k, t in block.named_parameters()}
    with computing_in(block, torch.bfloat16) as masters:
        # the already-bf16 Linear computes on its own tensor: the master must not see the writes
        block[1].weight.data.fill_(7.0)
        block[0].weight.data.fill_(7.0)
        assert masters[block[1]].dtype == torch.float32
        assert torch.equal(masters[block[1]], before["1.weight"].float())
        assert torch.equal(masters[block[0]], before["0.weight"])
        assert masters[block[0]].data_ptr() == fp32_storage  # the original itself, not a copy
    assert block[0].weight.data_ptr() == fp32_storage
    for k, t in block.named_parameters():
        assert t.dtype == before[k].dtype and torch.equal(t, before[k]), k


@pytest.mark.parametrize("fast,want", [(True, "bfloat16"), (False, "float32")])
def test_auto_calib_dtype_follows_the_device(monkeypatch, fast, want):
    import quantkit.compute
    from quantkit.methods.gptq.run import GPTQOptions, calib_dtype

    monkeypatch.setattr(quantkit.compute, "fast_bfloat16", lambda device: fast)
    assert calib_dtype(_job(GPTQOptions(calib_dtype="auto"))) == want
    assert calib_dtype(_job(GPTQOptions(calib_dtype="float16"))) == "float16"
