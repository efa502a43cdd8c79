"""llama.cpp's named mixes: per-tensor types by llama-quantize's rules, the export that writes them,
calibrated rounding, metadata parity with convert_hf_to_gguf.py, and `quantkit info` listing the types."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
from gguf import GGUFReader, GGMLQuantizationType
from gguf import quants as gq
from safetensors.torch import load_file
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.convert import convert
from quantkit.convert.gguf_mix import MixPlanner, fallback
from quantkit.convert.gguf_tensors import qk_permutation

Q = GGMLQuantizationType
runner = CliRunner()


def smollm2_like(n_layer: int = 30, hidden: int = 576, inter: int = 1536, tied: bool = True):
    """(name, shape) of a SmolLM2-shaped Llama in GGUF file order."""
    out = [("token_embd.weight", (49152, hidden))]
    for i in range(n_layer):
        out += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.attn_q.weight", (hidden, hidden)),
                (f"blk.{i}.attn_k.weight", (192, hidden)), (f"blk.{i}.attn_v.weight", (192, hidden)),
                (f"blk.{i}.attn_output.weight", (hidden, hidden)), (f"blk.{i}.ffn_gate.weight", (inter, hidden)),
                (f"blk.{i}.ffn_up.weight", (inter, hidden)), (f"blk.{i}.ffn_down.weight", (hidden, inter)),
                (f"blk.{i}.ffn_norm.weight", (hidden,))]
    out.append(("output_norm.weight", (hidden,)))
    if not tied:
        out.append(("output.weight", (49152, hidden)))
    return out


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def test_q4_k_m_on_a_576_wide_model_is_mostly_q5_0():
    plan = MixPlanner("q4_k_m", smollm2_like(), 30, n_gqa=3).plan()
    assert plan["token_embd.weight"] == Q.Q8_0 and plan["blk.0.attn_norm.weight"] == Q.F32
    for i in range(30):
        # attn_v: Q6_K where llama.cpp gives more bits, which falls back to Q8_0 at width 576; Q4_K -> Q5_0
        assert plan[f"blk.{i}.attn_v.weight"] == (Q.Q8_0 if more_bits(i, 30) else Q.Q5_0)
        # ffn_down has rows of 1536 (a multiple of 256): the K types stay
        assert plan[f"blk.{i}.ffn_down.weight"] == (Q.Q6_K if more_bits(i, 30) else Q.Q4_K)
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert plan[f"blk.{i}.{t}.weight"] == Q.Q5_0


def test_q2_k_and_q3_k_s_plan_the_same_types_at_width_576():
    # llama.cpp writes byte-identical tensors for both on SmolLM2 (benchmarks/results/gguf.md, session 11):
    # every 576-wide Q2_K/Q3_K falls back to Q4_0, and ffn_down (rows of 1536) is Q3_K in both mixes
    for im in (False, True):
        q2 = MixPlanner("q2_k", smollm2_like(), 30, n_gqa=3, has_imatrix=im).plan()
        q3s = MixPlanner("q3_k_s", smollm2_like(), 30, n_gqa=3, has_imatrix=im).plan()
        assert q2 == q3s
        assert {q2[f"blk.{i}.ffn_down.weight"] for i in range(30)} == {Q.Q3_K}
        assert {q2[f"blk.{i}.{t}.weight"] for i in range(30)
                for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")} == {Q.Q4_0}
        assert q2["token_embd.weight"] == Q.Q8_0
    # at a width the K blocks divide, the two mixes differ (Q2_K against Q3_K for the base type)
    wide = smollm2_like(n_layer=16, hidden=256, inter=512)
    assert MixPlanner("q2_k", wide, 16, n_gqa=3).plan()["blk.5.attn_q.weight"] == Q.Q2_K
    assert MixPlanner("q3_k_s", wide, 16, n_gqa=3).plan()["blk.5.attn_q.weight"] == Q.Q3_K


def test_mix_rules_at_width_256():
    tensors = smollm2_like(n_layer=16, hidden=256, inter=512, tied=False)
    q3m = MixPlanner("q3_k_m", tensors, 16, n_gqa=1).plan()
    assert [q3m[f"blk.{i}.attn_v.weight"] for i in range(3)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert q3m["blk.0.ffn_down.weight"] == Q.Q5_K and q3m["blk.1.ffn_down.weight"] == Q.Q4_K  # i < n/16
    assert q3m["blk.5.attn_output.weight"] == Q.Q4_K and q3m["blk.5.attn_q.weight"] == Q.Q3_K
    assert q3m["output.weight"] == Q.Q6_K and q3m["token_embd.weight"] == Q.Q3_K  # untied: the base type
    q2 = MixPlanner("q2_k", tensors, 16, n_gqa=4).plan()
    assert q2["blk.3.attn_v.weight"] == Q.Q4_K and q2["blk.3.ffn_down.weight"] == Q.Q3_K
    xs = MixPlanner("iq4_xs", tensors, 16, n_gqa=1).plan()
    assert xs["blk.0.ffn_down.weight"] == Q.Q5_K and xs["blk.2.ffn_down.weight"] == Q.IQ4_XS
    xs_im = MixPlanner("iq4_xs", tensors, 16, n_gqa=1, has_imatrix=True).plan()
    assert xs_im["blk.0.ffn_down.weight"] == Q.IQ4_XS
    q40_im = MixPlanner("q4_0", tensors, 16, has_imatrix=True).plan()
    assert q40_im["blk.1.ffn_down.weight"] == Q.Q4_1 and q40_im["blk.2.ffn_down.weight"] == Q.Q4_0
    over = MixPlanner("q4_k_m", tensors, 16, embd_type=Q.F16, output_type=Q.F16).plan()
    assert over["token_embd.weight"] == Q.F16 and over["output.weight"] == Q.F16


def test_fallbacks_for_widths_not_a_multiple_of_256():
    assert [fallback(t, 576) for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS)] == \
        [Q.Q4_0, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL]
    assert fallback(Q.Q4_K, 512) == Q.Q4_K and fallback(Q.Q4_K, 40) == Q.F16


def read(path):
    r = GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    fields = {k: f for k, f in r.fields.items()}
    return tensors, fields


def field_value(f):
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0].name == "STRING" else v.tolist()[0]


def test_q4_k_m_export_writes_the_planned_types_close_to_the_source(wide, tmp_path):
    out = tmp_path / "m.gguf"
    res = convert(wide, "gguf", out, gguf_type="q4_k_m")
    tensors, fields = read(out)
    hf = load_file(wide / "model.safetensors")
    # of 2 layers, llama.cpp's use_more_bits picks the last (i >= 7n/8)
    assert [tensors[f"blk.{i}.attn_v.weight"].tensor_type for i in (0, 1)] == [Q.Q4_K, Q.Q6_K]
    assert [tensors[f"blk.{i}.ffn_down.weight"].tensor_type for i in (0, 1)] == [Q.Q4_K, Q.Q6_K]
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q4_K
    assert tensors["token_embd.weight"].tensor_type == Q.Q6_K      # tied: llama.cpp's output type
    w = hf["model.layers.0.self_attn.q_proj.weight"][qk_permutation(256, 4)].numpy()
    t = tensors["blk.0.attn_q.weight"]
    back = gq.dequantize(t.data, t.tensor_type).reshape(w.shape)
    assert np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean()) < 0.1
    assert res.provenance["tensor_types"]["Q4_K"] >= 6 and res.provenance["calibrated"] is False
    assert field_value(fields["general.file_type"]) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert field_value(fields["general.type"]) == "model"
    assert field_value(fields["llama.attention.key_length"]) == 64
    assert "general.quantization_version" in fields
    assert stat.S_IMODE(out.stat().st_mode) & 0o044 == 0o044  # readable by group and others


def test_calibrated_export_lowers_the_activation_weighted_error(wide, tmp_path):
    from quantkit.convert.imatrix import compute_importance

    imp = compute_importance(wide, dataset=str(_text(tmp_path)), nsamples=4, seqlen=64)
    plain, cal = tmp_path / "p.gguf", tmp_path / "c.gguf"
    convert(wide, "gguf", plain, gguf_type="q3_k_m")
    imat = tmp_path / "m.imatrix.gguf"
    from quantkit.convert.imatrix import write_imatrix

    write_imatrix(wide, imat, dataset=str(_text(tmp_path)), nsamples=4, seqlen=64)
    res = convert(wide, "gguf", cal, gguf_type="q3_k_m", use_imatrix=imat)
    assert res.provenance["calibrated"] is True
    hf = load_file(wide / "model.safetensors")
    pt, _ = read(plain)
    ct, _ = read(cal)
    better = 0
    for name, gname in (("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"), ("self_attn.o_proj", "attn_output")):
        w = hf[f"model.layers.1.{name}.weight"].numpy()
        qw = imp[f"blk.1.{gname}.weight"]
        err = [float((((gq.dequantize(t[f"blk.1.{gname}.weight"].data, t[f"blk.1.{gname}.weight"].tensor_type)
                        .reshape(w.shape) - w) ** 2) * qw).sum()) for t in (pt, ct)]
        better += err[1] < err[0]
    assert better == 3


def _text(tmp_path):
    from tests.tiny import write_text

    path = tmp_path / "calib.txt"
    return path if path.exists() else write_text(path)


def test_cli_mix_and_info_list_the_types(wide, tmp_path):
    out = tmp_path / "x.gguf"
    r = runner.invoke(app, ["convert", str(wide), str(out), "--to", "gguf", "--type", "iq4_xs",
                            "--embed-type", "q8_0", "--json", "-"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["tensor_types"]["IQ4_XS"] >= 1 and summary["tensor_types"]["Q8_0"] == 1
    info = runner.invoke(app, ["info", str(out), "--json", "-"])
    assert info.exit_code == 0, info.output
    assert {"IQ4_XS", "Q8_0", "F32"} <= set(json.loads(info.stdout)["types"])
    bad = runner.invoke(app, ["convert", str(wide), str(tmp_path / "y.gguf"), "--to", "gguf", "--type", "q4_k_x"])
    assert bad.exit_code == 2 and "q4_k_m" in bad.output


def test_smollm2_metadata_matches_llama_cpp_converter(tmp_path):
    from quantkit.convert.gguf_vocab import pre_by_hash
    from pathlib import Path

    tok = Path.home() / ".cache/quantkit/models/smollm2-135m/tokenizer.json"
    if not tok.is_file():
        pytest.skip("smollm2-135m is not cached")
    assert pre_by_hash(tok) == "smollm"


def test_mix_export_is_byte_identical_on_a_second_run(wide, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(wide, "gguf", a, gguf_type="q2_k")
    convert(wide, "gguf", b, gguf_type="q2_k")
    assert a.read_bytes() == b.read_bytes()


def test_packed_checkpoint_embedding_follows_llama_cpp(tiny_llama, tmp_path):
    """A calibrated 4-bit checkpoint's q4_0 file: Linears keep their codes, the tied embedding takes llama.cpp's
    Q8_0 (it stayed F16 before, 118 MB against llama.cpp's 92 MB on SmolLM2)."""
    from quantkit.api import quantize

    ck = tmp_path / "sym32"
    quantize(tiny_llama, "rtn", ck, scheme={"bits": 4, "group_size": 32, "sym": True}, device="cpu")
    res = convert(ck, "gguf", tmp_path / "q40.gguf", gguf_type="q4_0")
    tensors, _ = read(tmp_path / "q40.gguf")
    assert res.provenance["requantized"] == 0 and res.provenance["grid_kept"] == 14
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
    assert res.provenance["floats_quantized"] == ["token_embd.weight"]
    kept = convert(ck, "gguf", tmp_path / "f16emb.gguf", gguf_type="q4_0", embed_type="f16")
    assert read(tmp_path / "f16emb.gguf")[0]["token_embd.weight"].tensor_type == Q.F16 and kept.exact
    assert "floats_quantized" not in kept.provenance
