"""GGUF export (f32/q8_0/q4_0/q4_1, grid kept), llama.cpp keys, GGUF import, imatrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gq
from safetensors.torch import load_file

from quantkit.api import quantize
from quantkit.convert import convert
from quantkit.convert.gguf_tensors import qk_permutation
from quantkit.loading import load

IDS = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
HEADS, KV_HEADS = 4, 2
LLAMA_KEYS = ("general.architecture", "llama.context_length", "llama.block_count", "llama.embedding_length",
              "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
              "llama.rope.freq_base", "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon",
              "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def gguf_weights(path: Path) -> dict[str, tuple[GGMLQuantizationType, np.ndarray, torch.Tensor]]:
    """llama.cpp name -> (type, raw data, dequantized (rows, cols) float32) read with the gguf package."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        deq = gq.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = (t.tensor_type, np.asarray(t.data), torch.from_numpy(deq.reshape(shape).copy()))
    return out


def source_weight(hf: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The HF weight in llama.cpp row order (q/k permuted)."""
    w = hf[name]
    if ".q_proj." in name:
        return w[qk_permutation(w.shape[0], HEADS)]
    if ".k_proj." in name:
        return w[qk_permutation(w.shape[0], KV_HEADS)]
    return w


GG = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
      "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def linear_pairs(n_layers: int = 2):
    for i in range(n_layers):
        for hf, gg in GG.items():
            yield f"model.layers.{i}.{hf}", f"blk.{i}.{gg}.weight"


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {
        "fp": tiny_llama,
        "asym": quantize(tiny_llama, "rtn", root / "asym", scheme={"bits": 4, "group_size": 32, "sym": False},
                         device="cpu") and root / "asym",
        "sym64": quantize(tiny_llama, "rtn", root / "sym64", scheme={"bits": 4, "group_size": 64, "sym": True},
                          device="cpu") and root / "sym64",
        "root": root,
    }


def test_f32_export_reloads_in_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert(tiny["fp"], "gguf", tmp_path / "m.gguf", gguf_type="f32")
    assert out.exact
    src = AutoModelForCausalLM.from_pretrained(tiny["fp"]).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (src(IDS).logits - back(IDS).logits).abs().max() < 1e-4


def test_q8_0_within_block_error_bound(tiny, tmp_path):
    path = tmp_path / "q8.gguf"
    convert(tiny["fp"], "gguf", path, gguf_type="q8_0")
    hf = load_file(tiny["fp"] / "model.safetensors")
    got = gguf_weights(path)
    for hf_name, gg_name in linear_pairs():
        qtype, _, deq = got[gg_name]
        assert qtype == GGMLQuantizationType.Q8_0
        w = source_weight(hf, hf_name + ".weight")
        blocks = w.reshape(w.shape[0], -1, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127  # the block's step
        # rounding to the step (d/2) plus the fp16 rounding of d applied to |q| <= 127
        bound = d * (0.5 + 127 * 2.0 ** -11) + 1e-7
        assert ((deq.reshape(blocks.shape) - blocks).abs() <= bound).all(), hf_name


def test_gptq_g32_to_q4_1_keeps_codes(tiny, tmp_path):
    path = tmp_path / "q41.gguf"
    res = convert(tiny["asym"], "gguf", path, gguf_type="q4_1")
    assert res.exact and res.provenance["grid_kept"] == 14 and res.provenance["requantized"] == 0
    model = load(tiny["asym"])
    got = gguf_weights(path)
    for hf_name, gg_name in linear_pairs():
        qtype, raw, deq = got[gg_name]
        assert qtype == GGMLQuantizationType.Q4_1
        qw = model.get_submodule(hf_name).quantized()
        ref = qw.dequantize()
        if ".q_proj" in hf_name or ".k_proj" in hf_name:
            ref = ref[qk_permutation(ref.shape[0], HEADS if ".q_proj" in hf_name else KV_HEADS)]
        # only the min m = -scale*zero is rounded to fp16: |error| <= |scale*zero| * 2**-11 per group
        sz = (qw.scales * qw.zeros.float())
        if ".q_proj" in hf_name or ".k_proj" in hf_name:
            sz = sz[qk_permutation(sz.shape[0], HEADS if ".q_proj" in hf_name else KV_HEADS)]
        bound = sz.repeat_interleave(32, dim=1) * 2.0 ** -11 + 1e-9
        assert ((deq - ref).abs() <= bound).all(), hf_name
        # the nibbles are the GPTQ codes, unchanged
        blocks = raw.reshape(-1, 20)
        nib = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1).reshape(ref.shape)
        codes = qw.codes
        if ".q_proj" in hf_name or ".k_proj" in hf_name:
            codes = codes[qk_permutation(codes.shape[0], HEADS if ".q_proj" in hf_name else KV_HEADS)]
        assert np.array_equal(nib, codes.numpy())


def test_symmetric_group_64_to_q4_0_is_bit_exact(tiny, tmp_path):
    path = tmp_path / "q40.gguf"
    res = convert(tiny["sym64"], "gguf", path, gguf_type="q4_0")
    assert res.exact and res.provenance["requantized"] == 0
    model = load(tiny["sym64"])
    got = gguf_weights(path)
    for hf_name, gg_name in linear_pairs():
        ref = model.get_submodule(hf_name).dequantize()
        if ".q_proj" in hf_name or ".k_proj" in hf_name:
            ref = ref[qk_permutation(ref.shape[0], HEADS if ".q_proj" in hf_name else KV_HEADS)]
        assert torch.equal(got[gg_name][2], ref), hf_name


def test_asymmetric_grid_to_q4_0_is_requantized_with_error(tiny, tmp_path, caplog):
    res = convert(tiny["asym"], "gguf", tmp_path / "q40.gguf", gguf_type="q4_0")
    assert not res.exact and res.provenance["requantized"] == 14
    assert 0 < res.provenance["added_error"]["rel_rmse"] < 0.5
    assert "re-quantized" in caplog.text
    prov = json.loads((tmp_path / "q40.gguf.quantkit_provenance.json").read_text())
    assert prov["kind"] == "lossy" and prov["added_error"] == res.provenance["added_error"]


def test_reader_sees_every_key_llama_cpp_needs(tiny, tmp_path):
    path = tmp_path / "m.gguf"
    convert(tiny["asym"], "gguf", path, gguf_type="q4_1")
    r = GGUFReader(str(path))
    missing = [k for k in LLAMA_KEYS if k not in r.fields]
    assert not missing
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == 2
    assert r.fields["llama.attention.head_count_kv"].contents() == KV_HEADS
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[0] == "<|endoftext|>"
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 0
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 0
    assert "quantkit.provenance" in r.fields
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= names


def test_gguf_import_round_trip(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    gg = tmp_path / "m.gguf"
    convert(tiny["asym"], "gguf", gg, gguf_type="q4_1")
    hf = convert(gg, "hf", tmp_path / "hf").out
    prov = json.loads((hf / "quantkit_provenance.json").read_text())
    assert prov["source_format"] == "gguf" and prov["gguf_tensor_types"]["Q4_1"] == 14
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    ref = load(tiny["asym"]).eval()
    with torch.no_grad():
        assert (model(IDS).logits - ref(IDS).logits).abs().max() < 1e-2


def test_imatrix_is_mean_square_of_inputs(tiny, tmp_path):
    from quantkit.convert.imatrix import write_imatrix

    path = tmp_path / "imatrix.gguf"
    facts = write_imatrix(tiny["fp"], path, nsamples=2, seqlen=32)
    assert facts["entries"] == 14
    r = GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == 2
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    assert float(t["blk.0.attn_q.weight.counts"].reshape(-1)[0]) == 64
    # q, k and v read the same input: their sums of squares agree
    assert np.array_equal(t["blk.0.attn_q.weight.in_sum2"], t["blk.0.attn_k.weight.in_sum2"])
    assert t["blk.1.ffn_down.weight.in_sum2"].size == 128 and (t["blk.1.ffn_down.weight.in_sum2"] > 0).all()


def test_pre_tokenizer_names_are_ones_llama_cpp_knows():
    """llama.cpp refuses a file whose tokenizer.ggml.pre it does not know ("gpt2" is not one: "gpt-2" is)."""
    from quantkit.convert.gguf_vocab import pre_tokenizer_name

    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name(smollm) == "smollm"
    assert pre_tokenizer_name(None) == "default"
