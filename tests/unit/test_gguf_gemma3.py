"""Gemma 3 GGUF export read back with the gguf package: llama.cpp's keys, names, shapes, the 1 + w norms, the vocab."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from safetensors.torch import load_file

from quantkit.convert import convert, gguf_provenance_path
from quantkit.errors import QuantkitError
from tests.unit.test_convert_gguf import gguf_weights

Q = GGMLQuantizationType
BLOCK_TENSORS = {  # llama.cpp name -> HF name (under model.layers.N.), as llama.cpp's Gemma 3 loader creates them
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm",
}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from tests.tiny import make_gemma3

    return make_gemma3(tmp_path_factory.mktemp("gemma3") / "g3")


def hf_name(gname: str) -> str:
    if gname.startswith("blk."):
        _, i, kind, _ = gname.split(".")
        return f"model.layers.{i}.{BLOCK_TENSORS[kind]}.weight"
    return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}[gname]


def fields(path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def test_f32_keys_names_and_norms_as_llama_cpp_reads_them(gemma, tmp_path):
    out = tmp_path / "g.gguf"
    res = convert(gemma, "gguf", out, gguf_type="f32")
    assert res.exact
    kv = fields(out)
    assert kv["general.architecture"] == "gemma3" and kv["general.file_type"] == 0
    expect = {"block_count": 3, "context_length": 512, "embedding_length": 256, "feed_forward_length": 512,
              "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
              "attention.value_length": 64, "rope.freq_base": 1e6, "rope.freq_base_swa": 1e4,
              "attention.sliding_window": 8}
    for k, v in expect.items():
        assert kv[f"gemma3.{k}"] == pytest.approx(v), k
    assert kv["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    # layers 0 and 2 slide, 1 is global: not llama.cpp's period-6 default, so the per-layer array is written
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, False, True]
    # what the converter leaves out for Gemma 3 (llama.cpp derives n_rot from key_length) and what it has no key for
    for absent in ("gemma3.rope.dimension_count", "gemma3.vocab_size", "gemma3.final_logit_softcapping",
                   "gemma3.rope.scaling.type", "gemma3.attention.query_pre_attn_scalar"):
        assert absent not in kv
    assert kv["general.quantization_version"] == 2

    hf = load_file(gemma / "model.safetensors")
    got = gguf_weights(out)
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{k}.weight" for i in range(3) for k in BLOCK_TENSORS}
    assert set(got) == names  # tied: no output.weight, llama.cpp reuses token_embd
    for gname, (qtype, _, w) in got.items():
        ref = hf[hf_name(gname)].float()
        assert qtype == Q.F32 and tuple(w.shape) == tuple(ref.shape), gname
        if gname.endswith("norm.weight"):
            assert torch.equal(w, ref + 1), gname  # Gemma computes x * (1 + w); llama.cpp multiplies by the stored value
            assert ref.abs().max() > 0.1  # the tiny model's norms are not the zeros they start as
        else:
            assert torch.equal(w, ref), gname  # q/k rows in HF order: NEOX rope, no permutation


def test_vocab_is_the_spm_style_bpe_llama_cpp_runs_as_gemma4(gemma, tmp_path):
    out = tmp_path / "g.gguf"
    convert(gemma, "gguf", out, gguf_type="f32")
    kv = fields(out)
    tok = json.loads((gemma / "tokenizer.json").read_text())
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gemma4"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    vocab = tok["model"]["vocab"]
    assert len(tokens) == 512 and tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), 512)]
    for t, i in vocab.items():
        assert tokens[i] == t
    assert [types[i] for i in range(4)] == [TokenType.CONTROL] * 4  # <pad> <eos> <bos> <unk>
    assert all(types[vocab[f"<0x{b:02X}>"]] == TokenType.BYTE for b in range(256))
    merged = [i for t, i in vocab.items() if len(t) > 1 and not t.startswith("<")]
    assert len(merged) > 100 and all(types[i] == TokenType.NORMAL for i in merged)
    assert all(types[i] == TokenType.UNUSED for i in range(len(vocab), 512))
    assert kv["tokenizer.ggml.bos_token_id"] == 2 and kv["tokenizer.ggml.eos_token_id"] == 1
    assert kv["tokenizer.ggml.add_bos_token"] is True  # from tokenizer.json's post-processor
    assert len(kv["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])


def test_q4_k_m_mix_keeps_norms_exact_and_is_deterministic(gemma, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(gemma, "gguf", a, gguf_type="q4_k_m")
    convert(gemma, "gguf", b, gguf_type="q4_k_m")
    assert a.read_bytes() == b.read_bytes()
    hf = load_file(gemma / "model.safetensors")
    got = gguf_weights(a)
    types = {g: t for g, (t, _, _) in got.items()}
    assert types["token_embd.weight"] == Q.Q6_K  # tied: llama.cpp gives the embedding the output's type
    assert {types[f"blk.{i}.attn_q.weight"] for i in range(3)} == {Q.Q4_K}
    # llama.cpp's use_more_bits(i, 3) holds for the last layer only: attn_v and ffn_down go to Q6_K there
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(3)] == [Q.Q4_K, Q.Q4_K, Q.Q6_K]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [Q.Q4_K, Q.Q4_K, Q.Q6_K]
    assert json.loads(gguf_provenance_path(a).read_text())["tensor_types"] == {"F32": 19, "Q4_K": 19, "Q6_K": 3}
    for gname, (qtype, _, w) in got.items():
        ref = hf[hf_name(gname)].float()
        if ref.dim() == 1:
            assert qtype == Q.F32 and torch.equal(w, ref + 1), gname
        else:
            rel = float((w - ref).norm() / ref.norm())
            assert rel < (0.02 if qtype == Q.Q6_K else 0.1), (gname, qtype.name, rel)


@pytest.mark.parametrize("change,needle", [
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256"),
    ({"attn_logit_softcapping": 50.0}, "soft-capping"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope scaling"),
])
def test_configs_llama_cpp_would_run_differently_are_refused(gemma, tmp_path, change, needle):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in gemma.iterdir():
        (folder / f.name).symlink_to(f)
    cfg = json.loads((gemma / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    out = tmp_path / "x.gguf"
    with pytest.raises(QuantkitError, match=needle):
        convert(folder, "gguf", out, gguf_type="f32")
    assert not out.exists()


def test_cli_refusal_is_one_line(gemma, tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    folder = tmp_path / "m"
    folder.mkdir()
    for f in gemma.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    cfg = json.loads((gemma / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "query_pre_attn_scalar": 100}))
    out = tmp_path / "x.gguf"
    r = CliRunner().invoke(app, ["convert", str(folder), str(out), "--to", "gguf", "--type", "f32"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Gemma3ForCausalLM does not support query_pre_attn_scalar 100" in lines[0]
    assert not out.exists()


def test_embedding_rows_and_scale_are_not_baked_in(gemma, tmp_path):
    """llama.cpp scales the embedding by sqrt(n_embd) in its graph: the stored rows are the HF table unscaled."""
    out = tmp_path / "g.gguf"
    convert(gemma, "gguf", out, gguf_type="q8_0")
    emb = gguf_weights(out)["token_embd.weight"][2]
    ref = load_file(gemma / "model.safetensors")["model.embed_tokens.weight"].float()
    assert emb.shape == ref.shape
    assert float((emb - ref).abs().max()) < float(ref.abs().max()) / 100
    assert np.isclose(float(emb.norm() / ref.norm()), 1.0, atol=1e-3)
