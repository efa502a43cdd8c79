"""Exact repacking GPTQ v1/v2 <-> AWQ GEMM <-> compressed-tensors: bit-identical weights and logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.api import quantize
from quantkit.convert import convert, source_format
from quantkit.convert.stream import PlannedTensor, StreamingWriter, scan
from quantkit.convert.table import TABLE, lookup
from quantkit.errors import CheckpointError, QuantkitError
from quantkit.formats.awq import pack_awq, unpack_awq
from quantkit.loading import load
from quantkit.formats.qlinear import QuantLinear

PACKED = ("gptq", "gptq-v2", "awq", "compressed-tensors")
IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def rtn(src: Path, out: Path, **scheme) -> Path:
    quantize(src, "rtn", out, scheme={"group_size": 32, **scheme}, device="cpu")
    return out


@torch.no_grad()
def snapshot(folder: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(dequantized weight of every QuantLinear, logits on IDS) of a checkpoint, from one load."""
    model = load(folder)
    weights = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return weights, model(IDS).logits


def dequantized(folder: Path) -> dict[str, torch.Tensor]:
    return snapshot(folder)[0]


def assert_same_model(a: Path | tuple, b: Path) -> None:
    wa, la = a if isinstance(a, tuple) else snapshot(a)
    wb, lb = snapshot(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert torch.equal(la, lb)


def with_act_order(src: Path, out: Path) -> Path:
    """A copy of a GPTQ checkpoint whose g_idx is a random (valid) permutation of its groups: act-order."""
    out.mkdir()
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for k in [k for k in tensors if k.endswith(".g_idx")]:
        tensors[k] = tensors[k][torch.randperm(tensors[k].numel(), generator=g)].contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "config.json":
            (out / f.name).write_text(f.read_text())
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["desc_act"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("repack")
    return {
        "asym": rtn(tiny_llama, root / "asym", bits=4, sym=False),
        "sym": rtn(tiny_llama, root / "sym", bits=4, sym=True),
        "w3": rtn(tiny_llama, root / "w3", bits=3, sym=False),
        "w8": rtn(tiny_llama, root / "w8", bits=8, sym=True, group_size=-1),
        "root": root,
    }


@pytest.mark.parametrize("grid", ["asym", "sym"])
def test_every_exact_pair_round_trips(models, grid):
    src = models[grid]
    ref = snapshot(src)
    root = models["root"] / f"pairs-{grid}"
    first = {}
    for dst in PACKED[1:]:
        first[dst] = convert(src, dst, root / dst).out
        assert source_format(first[dst]) == dst
        assert_same_model(ref, first[dst])
    if grid == "sym":  # the symmetric grid only changes what each target stores: direct hops suffice
        return
    for a, folder in first.items():
        for b in PACKED:
            if a == b:
                continue
            out = convert(folder, b, root / f"{a}-to-{b}").out
            assert_same_model(ref, out)


def test_compressed_tensors_config(models, tmp_path):
    for grid, sym in (("asym", False), ("sym", True)):
        out = convert(models[grid], "compressed-tensors", tmp_path / grid).out
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
        group = qc["config_groups"]["group_0"]
        assert group["targets"] == ["Linear"]
        w = group["weights"]
        assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "int", "group", 32, sym)
        infos = scan([out / "model.safetensors"])
        name = "model.layers.0.mlp.down_proj"
        assert infos[f"{name}.weight_packed"].shape == (64, 128 * 4 // 32)
        assert infos[f"{name}.weight_scale"].shape == (64, 128 // 32)
        assert (f"{name}.weight_zero_point" in infos) == (not sym)
        assert torch.equal(load_file(out / "model.safetensors")[f"{name}.weight_shape"], torch.tensor([64, 128]))


def test_three_and_eight_bits_round_trip_through_compressed_tensors(models, tmp_path):
    for grid in ("w3", "w8"):
        ct = convert(models[grid], "compressed-tensors", tmp_path / f"{grid}-ct").out
        back = convert(ct, "gptq", tmp_path / f"{grid}-back").out
        assert_same_model(models[grid], ct)
        assert_same_model(models[grid], back)
    w = json.loads((ct / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["strategy"], w["group_size"], w["num_bits"]) == ("channel", None, 8)


def test_act_order_keeps_g_idx_in_compressed_tensors(models, tmp_path):
    src = with_act_order(models["asym"], tmp_path / "actorder")
    ct = convert(src, "compressed-tensors", tmp_path / "ct").out
    w = json.loads((ct / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert w["actorder"] == "group"
    assert_same_model(src, ct)
    assert_same_model(src, convert(ct, "gptq", tmp_path / "back").out)
    with pytest.raises(QuantkitError, match="act-order.*closest: --to compressed-tensors"):
        convert(src, "awq", tmp_path / "awq")
    assert not (tmp_path / "awq").exists()


def test_zero_point_of_zero_needs_gptq_v2(models, tmp_path):
    awq = convert(models["asym"], "awq", tmp_path / "awq").out
    tensors = load_file(awq / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.qzeros"
    zeros = unpack_awq(tensors[key])
    zeros[0, 0] = 0
    tensors[key] = pack_awq(zeros)
    save_file(tensors, awq / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantkitError, match="zero point of 0.*closest: --to gptq-v2"):
        convert(awq, "gptq", tmp_path / "v1")
    assert_same_model(awq, convert(awq, "gptq-v2", tmp_path / "v2").out)


def test_three_bits_cannot_become_awq(models, tmp_path):
    with pytest.raises(QuantkitError, match="4-bit weights only"):
        convert(models["w3"], "awq", tmp_path / "awq")


def test_dequantize_to_hf(models, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = dequantized(models["asym"])
    out = convert(models["asym"], "hf", tmp_path / "fp32").out
    assert torch.equal(load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"],
                       ref["model.layers.0.self_attn.q_proj"])
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, w in ref.items():
        assert torch.equal(model.get_submodule(name).weight, w), name
    assert torch.equal(model(IDS).logits, snapshot(models["asym"])[1])
    half = convert(models["asym"], "hf", tmp_path / "bf16", dtype="bfloat16")
    assert not half.exact
    model = AutoModelForCausalLM.from_pretrained(half.out, dtype=torch.bfloat16)
    name = next(iter(ref))
    assert torch.equal(model.get_submodule(name).weight, ref[name].to(torch.bfloat16))
    prov = json.loads((out / "quantkit_provenance.json").read_text())
    assert prov["source_format"] == "gptq" and prov["kind"] == "exact" and prov["target_format"] == "hf"


def test_side_files_and_provenance(models, tmp_path):
    out = convert(models["sym"], "awq", tmp_path / "awq").out
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "quant_config.json"} <= names
    assert "quantize_config.json" not in names
    prov = json.loads((out / "quantkit_provenance.json").read_text())
    assert prov["kind"] == "exact" and prov["linears"] == 14 and prov["source_quantkit"]["method"] == "rtn"


def test_output_is_deterministic(models, tmp_path):
    a = convert(models["asym"], "compressed-tensors", tmp_path / "a").out
    b = convert(models["asym"], "compressed-tensors", tmp_path / "b").out
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_table_marks_pairs_and_names_closest_path():
    assert all(TABLE[a, b].exact for a in PACKED for b in PACKED if a != b)
    assert not TABLE["hf", "gguf"].exact
    with pytest.raises(QuantkitError, match="quantkit quantize"):
        lookup("hf", "awq")
    with pytest.raises(QuantkitError, match="first --to hf"):
        lookup("gguf", "gptq")
    with pytest.raises(QuantkitError, match="choose one of"):
        lookup("gptq", "exl2")


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int32)}
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items())]
    with StreamingWriter(tmp_path / "x.safetensors", plan) as w:
        for p in plan:
            w.write(p.name, tensors[p.name])
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_truncated_safetensors_is_refused(models, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(models["sym"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(bad, "awq", tmp_path / "out")
    assert not (tmp_path / "out").exists()
