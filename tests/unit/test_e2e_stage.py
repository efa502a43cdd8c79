"""The end-to-end stage as a shared part (`quantkit.methods.e2e.stage`): GPTQ takes it as SignRound does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import quantkit
from quantkit.api import quantize
from quantkit.errors import QuantkitError
from tests.tiny import llama_config, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("e2e") / "m", llama_config(hidden=64, inter=128))


def _calib(text_file):
    return {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}


def _kl_to_base(base_folder, folder, ids) -> float:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = quantkit.load(folder, kernel="reference")
    with torch.no_grad():
        p = torch.log_softmax(base(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _calibration_ids(folder, text_file) -> torch.Tensor:
    from transformers import AutoTokenizer

    from quantkit.calib.data import calibration_samples

    tok = AutoTokenizer.from_pretrained(folder)
    return calibration_samples(tok, str(text_file), 4, 32, 0, "text")


def test_gptq_with_end_to_end_stage_keeps_codes_tunes_scales_and_lowers_kl(tiny, text_file, tmp_path):
    kw = dict(scheme={"bits": 3, "group_size": 32}, calib=_calib(text_file), device="cpu")
    opts = {"calib_dtype": "float32", "e2e_steps": 8, "e2e_lr": 1e-2}
    quantize(tiny, "gptq", tmp_path / "a", options=opts, **kw)
    quantize(tiny, "gptq", tmp_path / "b", options=opts, **kw)
    quantize(tiny, "gptq", tmp_path / "plain", options={"calib_dtype": "float32"}, **kw)
    a, plain = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    qweights = [k for k in a if k.endswith("qweight")]
    assert qweights and all(torch.equal(a[k], plain[k]) for k in qweights)  # GPTQ's codes stay
    assert any(not torch.equal(a[k], plain[k]) for k in a if k.endswith("scales"))  # the scales moved
    ids = _calibration_ids(tiny, text_file)
    assert _kl_to_base(tiny, tmp_path / "a", ids) < _kl_to_base(tiny, tmp_path / "plain", ids)
    assert json.loads((tmp_path / "a" / "quantkit.json").read_text())["options"]["e2e_steps"] == 8
    assert '"e2e_steps"' not in (tmp_path / "plain" / "quantkit.json").read_text()  # off: not recorded


def test_gptq_end_to_end_on_a_rotated_model_loads(tiny, text_file, tmp_path):
    quantize(tiny, "gptq", tmp_path / "r", scheme={"bits": 4, "group_size": 32, "rotation": "hadamard"},
             calib=_calib(text_file), device="cpu", options={"calib_dtype": "float32", "e2e_steps": 2})
    model = quantkit.load(tmp_path / "r", kernel="reference")
    assert torch.isfinite(model(input_ids=torch.arange(1, 17).unsqueeze(0)).logits).all()
    # on an integer grid the default step is GRID_LR, recorded as resolved (as before the default became per target)
    from quantkit.methods.e2e.stage import GRID_LR
    assert json.loads((tmp_path / "r" / "quantkit.json").read_text())["options"]["e2e_lr"] == GRID_LR


@pytest.mark.parametrize("extra, match", [
    ({"scheme": "w8a8"}, "integer weight-only"),
    # onto GGUF the stage tunes the blocks' float headers and the norms (tests/unit/test_gguf_e2e.py), not codes
    ({"fmt": "gguf", "gguf_type": "q4_0", "options": {"e2e_steps": 2, "e2e_rounding_lr": 0.01}},
     "block scales and norms only"),
    ({"options": {"e2e_steps": 2, "offload": "disk"}}, "in memory"),
])
def test_gptq_end_to_end_refusals(tiny, text_file, tmp_path, extra, match):
    kw = {"scheme": {"bits": 4, "group_size": 32}, "options": {"e2e_steps": 2}, **extra}
    out = tmp_path / ("x.gguf" if "fmt" in extra else "x")
    with pytest.raises(QuantkitError, match=match):
        quantize(tiny, "gptq", out, calib=_calib(text_file), device="cpu", **kw)
    assert not out.exists()


def test_end_to_end_embedding_lever_is_written_and_deterministic(tiny, text_file, tmp_path):
    """`--opt e2e_embedding_lr`: the tuned (tied) embedding is what the checkpoint stores, the same bytes on a
    second run, the codes the same as without it; off, the stored embedding is the float model's."""
    kw = dict(scheme={"bits": 3, "group_size": 32}, calib=_calib(text_file), device="cpu")
    opts = {"calib_dtype": "float32", "e2e_steps": 8, "e2e_lr": 1e-2}
    quantize(tiny, "gptq", tmp_path / "off", options=opts, **kw)
    quantize(tiny, "gptq", tmp_path / "a", options={**opts, "e2e_embedding_lr": 1e-4}, **kw)
    quantize(tiny, "gptq", tmp_path / "b", options={**opts, "e2e_embedding_lr": 1e-4}, **kw)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    base = load_file(str(tiny / "model.safetensors"))
    off = load_file(str(tmp_path / "off" / "model.safetensors"))
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert torch.equal(off[key], base[key].to(off[key].dtype))
    assert not torch.equal(a[key], off[key])
    assert all(torch.equal(a[k], off[k]) for k in a if k.endswith("qweight"))
    assert "lm_head.weight" not in a  # still tied
    assert json.loads((tmp_path / "a" / "quantkit.json").read_text())["options"]["e2e_embedding_lr"] == 1e-4
    ids = _calibration_ids(tiny, text_file)
    assert _kl_to_base(tiny, tmp_path / "a", ids) < _kl_to_base(tiny, tmp_path / "off", ids)


def test_end_to_end_token_fraction_is_recorded_deterministic_and_checked(tiny, text_file, tmp_path):
    """`--opt e2e_token_fraction`: the stage takes a share of each step's positions (other scales than with all of
    them), the same bytes on a second run, recorded; out of (0, 1] it is refused before any work."""
    kw = dict(scheme={"bits": 3, "group_size": 32}, calib=_calib(text_file), device="cpu")
    opts = {"calib_dtype": "float32", "e2e_steps": 8, "e2e_lr": 1e-2}
    quantize(tiny, "gptq", tmp_path / "all", options=opts, **kw)
    quantize(tiny, "gptq", tmp_path / "a", options={**opts, "e2e_token_fraction": 0.5}, **kw)
    quantize(tiny, "gptq", tmp_path / "b", options={**opts, "e2e_token_fraction": 0.5}, **kw)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    full, a = load_file(str(tmp_path / "all" / "model.safetensors")), load_file(str(tmp_path / "a" / "model.safetensors"))
    assert any(not torch.equal(a[k], full[k]) for k in a if k.endswith("scales"))
    assert json.loads((tmp_path / "a" / "quantkit.json").read_text())["options"]["e2e_token_fraction"] == 0.5
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="e2e_token_fraction"):  # pydantic's; the CLI says it in one line
            quantize(tiny, "gptq", tmp_path / f"bad{bad}", options={**opts, "e2e_token_fraction": bad}, **kw)
        assert not (tmp_path / f"bad{bad}").exists()
