"""GPTQ on the output head (quantkit.methods.gptq.head): `quantize --method gptq --format gguf --opt head=gptq`
rounds the head (a tied embedding's one tensor, token_embd) with the Hessian of the final norm's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from torch import nn
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.convert.ggml_grid import BlockCodec, encode_on_grid
from quantkit.convert.gguf_quant import dequantize_rows, quantize_rows
from quantkit.methods.gptq.algorithm import GPTQParams
from quantkit.methods.gptq.activations import q8_0_activations
from quantkit.methods.gptq.head import HeadTarget, head_hessian, round_head

Q = GGMLQuantizationType
runner = CliRunner()


def _head(tied: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = 64
    mix = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5 + torch.eye(hidden)
    x = (torch.randn(4, 128, hidden, generator=g) @ mix) * torch.linspace(0.2, 3, hidden)  # correlated, uneven
    w = torch.randn(96, hidden, generator=g) * 0.05
    return HeadTarget("model.embed_tokens", w, BlockCodec(Q.Q8_0), nn.Identity(), tied), list(x)


def _params() -> GPTQParams:
    return GPTQParams(bits=8, group_size=-1, sym=True, desc_act=False, static_groups=False, damp=0.01,
                      block_size=128, damp_retries=3, group_aware=True)


def _errors(target: HeadTarget, data: np.ndarray, h: torch.Tensor) -> tuple[float, float]:
    """(the head's output error dᵀHd summed over rows, the lookup's error Σd²) of `data` against the weight."""
    d = torch.from_numpy(dequantize_rows(data, Q.Q8_0, target.weight.shape[1])).double() - target.weight.double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d)), float(d.square().sum())


def test_hessian_of_the_final_norm_outputs():
    target, hidden = _head(True)
    target.norm = nn.LayerNorm(64, elementwise_affine=False)
    stats = head_hessian(target, hidden, torch.device("cpu"))
    x = torch.cat([target.norm(b) for b in hidden]).double()
    assert stats.cross is None
    h = stats.h
    assert torch.allclose(h.double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


def test_head_rounding_trades_the_lookup_error_for_the_output_error():
    target, hidden = _head(True)
    stats = head_hessian(target, hidden, torch.device("cpu"))
    h = stats.h
    plain = quantize_rows(target.weight.numpy(), Q.Q8_0)              # the format's own rounding (RTN)
    out_plain, look_plain = _errors(target, plain, h)
    got = {lam: round_head(target, stats, _params(), lam)["model.embed_tokens"] for lam in (0.0, 1.0, 1e6)}
    for data in got.values():  # bytes of the Q8_0 layout, each block's codes on its own grid
        assert data.shape == plain.shape and data.dtype == np.uint8
        dec = dequantize_rows(data, Q.Q8_0, 64)
        assert np.array_equal(encode_on_grid(dec, data, Q.Q8_0), data)
    out0, look0 = _errors(target, got[0.0], h)
    out1, look1 = _errors(target, got[1.0], h)
    out_big, look_big = _errors(target, got[1e6], h)
    assert out0 < 0.7 * out_plain and look0 > look_plain             # the head alone: output error down
    assert out0 < out1 < out_plain and look0 > look1                   # the blend sits between
    assert abs(out_big / out_plain - 1) < 0.02 and abs(look_big / look_plain - 1) < 0.02  # large: plain rounding


def test_untied_head_ignores_the_embedding_weight():
    target, hidden = _head(False)
    target.name = "lm_head"
    stats = head_hessian(target, hidden, torch.device("cpu"))
    a = round_head(target, stats, _params(), 0.0)
    b = round_head(target, stats, _params(), 5.0)
    assert list(a) == ["lm_head"] and np.array_equal(a["lm_head"], b["lm_head"])


def test_q8_0_activations_are_ggmls():
    from gguf.quants import dequantize, quantize

    x = (torch.randn(16, 128) * torch.logspace(-2, 1, 128)).float()
    x[3, 5] = 0.0
    x[4, :32] = 0.0                                                     # an all-zero block
    want = dequantize(quantize(x.numpy(), Q.Q8_0), Q.Q8_0)
    assert np.array_equal(q8_0_activations(x, ref=True).numpy(), want)  # the scalar reference (gguf-py's)


def test_head_rounded_for_q8_0_activations():
    target, hidden = _head(True)
    x = torch.cat(hidden).double()
    xq = q8_0_activations(torch.cat(hidden)).double()

    def err(data: np.ndarray) -> float:  # ‖XWᵀ - X_q W_qᵀ‖²: the output error with quantized activations
        wq = torch.from_numpy(dequantize_rows(data, Q.Q8_0, 64)).double()
        return float((x @ target.weight.double().T - xq @ wq.T).square().sum())

    flt = head_hessian(target, hidden, torch.device("cpu"))
    act = head_hessian(target, hidden, torch.device("cpu"), act_q8=True)
    assert act.cross is not None and torch.allclose(act.h.double(), 2 * xq.T @ xq / xq.shape[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(act.cross.double(), 2 * x.T @ xq / x.shape[0], rtol=1e-5, atol=1e-6)
    a = round_head(target, flt, _params(), 0.0)["model.embed_tokens"]
    b = round_head(target, act, _params(), 0.0)["model.embed_tokens"]
    assert err(b) < err(a)
    target.codec = BlockCodec(Q.Q6_K)                                   # takes Q8_K activations: refused
    with pytest.raises(ValueError, match="Q8_K"):
        round_head(target, act, _params(), 0.0)


def _quantize(model, out, text_file, *extra):
    return runner.invoke(app, ["quantize", str(model), "--method", "gptq", "--out", str(out), "--format", "gguf",
                               "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
                               "--type", "q8_0", "--quiet", *extra])


@pytest.mark.parametrize("opts", [["--opt", "head_embed_weight=0"], [], ["--opt", "head_activations=q8_0"]],
                         ids=["w0", "default", "act"])
def test_cli_head_gptq_changes_only_the_head(tiny_llama, text_file, tmp_path, opts):
    plain, head = tmp_path / "plain.gguf", tmp_path / "head.gguf"
    r = _quantize(tiny_llama, plain, text_file, "--opt", "head=plain")
    assert r.exit_code == 0, r.output
    r = _quantize(tiny_llama, head, text_file, *opts)  # head=gptq by default (head_embed_weight 0.1)
    assert r.exit_code == 0, r.output
    a = {t.name: t for t in GGUFReader(str(plain)).tensors}
    b = {t.name: t for t in GGUFReader(str(head)).tensors}
    assert plain.stat().st_size == head.stat().st_size
    emb_a, emb_b = np.asarray(a["token_embd.weight"].data), np.asarray(b["token_embd.weight"].data)
    assert b["token_embd.weight"].tensor_type == Q.Q8_0 and "output.weight" not in b  # tied: one tensor
    assert not np.array_equal(emb_a, emb_b)                           # the head moved
    dec = dequantize_rows(emb_b, Q.Q8_0, int(b["token_embd.weight"].shape[0]))
    assert np.array_equal(encode_on_grid(dec, emb_b, Q.Q8_0), emb_b)  # and its codes lie on its own grid
    for name in a:  # the decoder Linears come before the head: the same bytes
        if name != "token_embd.weight":
            assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


@pytest.mark.parametrize("opts, words", [
    (["--opt", "head_activations=q8_0"], "goes with --format gguf"),  # the head has a grid only in GGUF
    (["--format", "gguf", "--opt", "head=gptq", "--opt", "head_embed_weight=-1"], "--head-embed-weight"),
])
def test_cli_head_bad_input_is_one_line(tiny_llama, text_file, tmp_path, opts, words):
    out = tmp_path / "o.gguf"
    r = runner.invoke(app, ["quantize", str(tiny_llama), "--method", "gptq", "--out", str(out), "--dataset",
                            str(text_file), "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--quiet", *opts])
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output
    assert not out.exists()
