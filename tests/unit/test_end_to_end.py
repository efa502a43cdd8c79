"""A tiny random Llama through RTN: quantize, save, reload, compare; determinism; loader checks."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.api import quantize
from quantkit.errors import CheckpointError, OutputExistsError, SchemeError
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import rtn_quantize


def _reference(base, bits, group, sym):
    """The base model with every block Linear replaced by its RTN-dequantized weight (fp16 elsewhere)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(base).eval()
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            mod.weight.data = rtn_quantize(mod.weight, bits, group, sym).dequantize()
    ref.model.embed_tokens.weight.data = ref.model.embed_tokens.weight.data.half().float()
    for name, p in ref.named_parameters():
        if "norm" in name:
            p.data = p.data.half().float()
    return ref


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 64, False), (8, -1, True), (2, 32, True)])
def test_rtn_checkpoint_reloads_to_the_dequantized_reference(tiny_llama, tmp_path, bits, group, sym):
    out = tmp_path / "q"
    quantize(tiny_llama, "rtn", out, scheme={"bits": bits, "group_size": group, "sym": sym}, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (bits, group, sym, False)
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == bits
    for f in ("tokenizer.json", "generation_config.json", "quantkit.json", "model.safetensors"):
        assert (out / f).is_file(), f

    model = quantkit.load(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        want = _reference(tiny_llama, bits, group, sym)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tensor_layout_on_disk(tiny_llama, tmp_path):
    quantize(tiny_llama, "rtn", tmp_path / "q", scheme="w4g64", device="cpu")
    t = load_file(tmp_path / "q" / "model.safetensors")
    p = "model.layers.0.mlp.down_proj"  # in 128, out 64
    assert t[f"{p}.qweight"].shape == (128 * 4 // 32, 64) and t[f"{p}.qweight"].dtype == torch.int32
    assert t[f"{p}.qzeros"].shape == (2, 64 * 4 // 32) and t[f"{p}.qzeros"].dtype == torch.int32
    assert t[f"{p}.scales"].shape == (2, 64) and t[f"{p}.scales"].dtype == torch.float16
    assert t[f"{p}.g_idx"].equal(torch.arange(128, dtype=torch.int32) // 64)
    assert "lm_head.weight" not in t  # tied to the embeddings
    assert f"{p}.weight" not in t


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_two_runs_are_byte_identical(tiny_llama, tmp_path):
    quantize(tiny_llama, "rtn", tmp_path / "a", scheme="w4g64", device="cpu")
    quantize(tiny_llama, "rtn", tmp_path / "b", scheme="w4g64", device="cpu")
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_existing_output_needs_force_and_nothing_half_written(tiny_llama, tmp_path):
    out = tmp_path / "q"
    quantize(tiny_llama, "rtn", out, scheme="w4g64", device="cpu")
    with pytest.raises(OutputExistsError):
        quantize(tiny_llama, "rtn", out, scheme="w4g64", device="cpu")
    before = _hashes(out)
    with pytest.raises(SchemeError):
        quantize(tiny_llama, "rtn", out, scheme={"bits": 4, "group_size": 96}, device="cpu", force=True)
    assert _hashes(out) == before  # a failed run leaves the old output alone
    quantize(tiny_llama, "rtn", out, scheme="w3g64", device="cpu", force=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary folders left behind


def test_loader_rejects_malformed_folders(tiny_llama, tmp_path):
    out = tmp_path / "q"
    quantize(tiny_llama, "rtn", out, scheme="w4g64", device="cpu")
    t = load_file(out / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.qweight"
    t[name] = t[name][:-1].contiguous()
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj.qweight has shape \(7, 64\), expected \(8, 64\)"):
        quantkit.load(out)
    (out / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged: its safetensors header is not valid"):
        quantkit.load(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        quantkit.load(out)


def test_loaded_model_generates(tiny_llama, tmp_path):
    quantize(tiny_llama, "rtn", tmp_path / "q", scheme="w4g64", device="cpu")
    model = quantkit.load(tmp_path / "q")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
