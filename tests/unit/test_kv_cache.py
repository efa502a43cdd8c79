"""The quantized KV cache (`--kv-cache fp8`): the FP8 maths, the scales measured where vLLM quantizes (keys after
RoPE, values as projected, per KV head before GQA repeats them), the bytes-per-token formula, the checkpoint
(kv_cache_scheme, self_attn.k_scale / v_scale), its load and eval, and the one-line refusals."""

import json

import pytest
import torch
from typer.testing import CliRunner

from quantkit import api
from quantkit.cli.main import app
from tests.tiny import assert_quantize_refused
from quantkit.grid import FP8_MAX
from quantkit.loading import load
from quantkit.models.arch import get_arch, get_blocks
from quantkit.models.kvcache import (KVCacheError, attention_modules, bytes_per_token, check_hookable, fake_quant,
                                     install, observing, scale_from_amax, scales_from)
from quantkit.scheme import make_scheme

runner = CliRunner()


def calib(text_file, n=4):
    return dict(dataset=str(text_file), nsamples=n, seqlen=32, batch_size=2)


def float_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---------------------------------------------------------------- the FP8 maths


def test_fake_quant_rounds_to_e4m3_on_the_scale_and_saturates():
    s = torch.tensor([0.5])
    # e4m3 steps of 0.125 in [1, 2): ties go to the even mantissa; 2.0625 lies between 2.0 and 2.25 (step 0.25)
    y = torch.tensor([1.0625, 1.1875, 1.3, 2.0625, 2.2, 448.0, 500.0, -1000.0, 0.0]) * s
    want = torch.tensor([1.0, 1.25, 1.25, 2.0, 2.25, 448.0, 448.0, -448.0, 0.0]) * s
    assert torch.equal(fake_quant(y, s), want)
    assert torch.equal(fake_quant(fake_quant(y, s), s), fake_quant(y, s))  # a stored value stores as itself


def test_fake_quant_keeps_the_dtype_and_computes_in_float32():
    x = torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    s = scale_from_amax(x.abs().amax())
    half = fake_quant(x.half(), s)
    assert half.dtype == torch.float16
    assert torch.equal(half, fake_quant(x.half().float(), s).half())
    assert float((fake_quant(x, s) - x).abs().max()) <= float(x.abs().max()) / 16  # 3 mantissa bits: <= 1/16 relative


def test_scale_is_amax_over_448():
    assert torch.equal(scale_from_amax(torch.tensor(896.0)), torch.tensor([2.0]))
    assert float(scale_from_amax(torch.tensor(0.0))) > 0  # a silent layer still divides safely
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))
    s = scale_from_amax(x.abs().amax())
    assert float((x / s).abs().max()) == pytest.approx(FP8_MAX)  # the largest value lands on the grid's end


# ---------------------------------------------------------------- where the scales are measured


def test_scales_are_measured_after_rope_and_per_kv_head(tiny_llama):
    """Layer 0's key amax is that of RoPE(k_proj(norm(embed))) over the KV heads (GQA: 2 of them, not 4), and its
    value amax that of v_proj(norm(embed)), recomputed here by hand."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = float_model(tiny_llama)
    attn = attention_modules(model, get_blocks(model, get_arch(model)))
    assert list(attn) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), observing(model, attn) as amax:
        model(input_ids=ids, use_cache=False)
    with torch.no_grad():
        a = model.model.layers[0].self_attn
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = a.k_proj(h).view(2, 24, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(2, 24, -1, a.head_dim).transpose(1, 2)
        pos = torch.arange(24).unsqueeze(0).expand(2, -1)
        cos, sin = model.model.rotary_emb(h, pos)
        q = a.q_proj(h).view(2, 24, -1, a.head_dim).transpose(1, 2)
        _, k_rope = apply_rotary_pos_emb(q, k, cos, sin)
    assert k.shape[1] == 2  # GQA: the cache holds the 2 KV heads
    assert torch.allclose(amax["model.layers.0.self_attn"][0], k_rope.abs().amax(), rtol=1e-6)
    assert not torch.allclose(amax["model.layers.0.self_attn"][0], k.abs().amax(), rtol=1e-3)  # RoPE moved it
    assert torch.allclose(amax["model.layers.0.self_attn"][1], v.abs().amax(), rtol=1e-6)
    scales = scales_from(amax, "LlamaForCausalLM")
    assert torch.equal(scales["model.layers.0.self_attn"][0], scale_from_amax(amax["model.layers.0.self_attn"][0]))
    assert not hasattr(a, "_quantkit_kv_amax")  # the recorder is gone after calibration


def test_hooked_attention_is_sdpa_on_the_fake_quantized_cache(tiny_llama):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = float_model(tiny_llama)
    name = install(model)
    assert name == "quantkit-kv|sdpa" and model.config._attn_implementation == name
    mod = model.model.layers[0].self_attn
    ks, vs = torch.tensor([0.01]), torch.tensor([0.02])
    mod.register_buffer("k_scale", ks, persistent=False)
    mod.register_buffer("v_scale", vs, persistent=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 8, 16, generator=g) for n in (4, 2, 2))
    ours, _ = ALL_ATTENTION_FUNCTIONS.get_interface(name, None)(mod, q, k, v, None, scaling=0.25)
    want, _ = sdpa_attention_forward(mod, q, fake_quant(k, ks), fake_quant(v, vs), None, scaling=0.25)
    plain, _ = sdpa_attention_forward(mod, q, k, v, None, scaling=0.25)
    assert torch.equal(ours, want) and not torch.equal(ours, plain)


def test_unhookable_attention_and_unreached_layers_are_refused():
    class OwnAttention(torch.nn.Module):
        def forward(self, x):
            return x  # computes attention itself: no attention interface to hook

    with pytest.raises(KVCacheError, match="cannot hook"):
        check_hookable({"layers.0.attn": OwnAttention()}, "OwnForCausalLM")
    with pytest.raises(KVCacheError, match="never reached"):
        scales_from({"layers.0.attn": [torch.tensor(-1.0), torch.tensor(-1.0)]}, "OwnForCausalLM")


# ---------------------------------------------------------------- bytes per token


def test_bytes_per_token_is_gqa_aware(tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 4, 2)
    assert bytes_per_token(cfg, 2) == 2 * 2 * 16 * 2 * 2  # layers x KV heads x head dim (64/4) x (k, v) x fp16
    assert bytes_per_token(cfg, 1) == bytes_per_token(cfg, 2) // 2
    gemma_like = {"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                  "hidden_size": 640}
    assert bytes_per_token(gemma_like, 1) == 18 * 1 * 256 * 2  # an explicit head_dim wins over hidden / heads
    assert bytes_per_token({"text_config": gemma_like}, 2) == 18 * 256 * 2 * 2
    assert bytes_per_token({"num_hidden_layers": 2}, 2) is None


# ---------------------------------------------------------------- checkpoint, load, eval


@pytest.fixture(scope="module")
def kv_checkpoints(tiny_llama, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv")
    for name, preset in (("plain", "fp8-dynamic"), ("kv", "fp8-dynamic")):
        scheme = make_scheme(preset, kv_cache="fp8" if name == "kv" else None)
        api.quantize(str(tiny_llama), "rtn", out / name, scheme=scheme, calib=calib(text_file), device="cpu")
    return out


def test_checkpoint_carries_the_scheme_and_the_scales(kv_checkpoints):
    from safetensors.torch import load_file

    qc = json.loads((kv_checkpoints / "kv" / "config.json").read_text())["quantization_config"]
    kv = qc["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["strategy"], kv["dynamic"], kv["symmetric"]) == (8, "float", "tensor",
                                                                                          False, True)
    plain = json.loads((kv_checkpoints / "plain" / "config.json").read_text())["quantization_config"]
    assert plain["kv_cache_scheme"] is None
    t = load_file(str(kv_checkpoints / "kv" / "model.safetensors"))
    p = load_file(str(kv_checkpoints / "plain" / "model.safetensors"))
    names = {k for k in t if k.endswith(("k_scale", "v_scale"))}
    assert names == {f"model.layers.{i}.self_attn.{x}_scale" for i in (0, 1) for x in "kv"}
    assert all(t[n].shape == (1,) and t[n].dtype == torch.float16 and float(t[n]) > 0 for n in names)
    assert set(t) - names == set(p) and all(torch.equal(t[k], p[k]) for k in p)  # same weights, plus the scales
    meta = json.loads((kv_checkpoints / "kv" / "quantkit.json").read_text())
    assert meta["scheme"]["kv_cache"] == "fp8" and "kv_cache" not in json.loads(
        (kv_checkpoints / "plain" / "quantkit.json").read_text())["scheme"]


def test_scales_come_from_the_quantized_model(kv_checkpoints, text_file):
    """The stored scales are max|k| / 448 and max|v| / 448 of the quantized checkpoint (float cache) over the
    calibration windows, rounded to the save dtype."""
    from quantkit.calib.data import calibration_samples
    from safetensors.torch import load_file

    model = load(kv_checkpoints / "plain")
    attn = attention_modules(model, get_blocks(model, get_arch(model)))
    tok = __import__("transformers").AutoTokenizer.from_pretrained(kv_checkpoints / "plain")
    samples = calibration_samples(tok, str(text_file), 4, 32, 0)
    with torch.no_grad(), observing(model, attn) as amax:
        for batch in samples.split(2):
            model(input_ids=batch, use_cache=False)
    t = load_file(str(kv_checkpoints / "kv" / "model.safetensors"))
    for name, (k, v) in amax.items():
        assert torch.equal(t[f"{name}.k_scale"], scale_from_amax(k).half())
        assert torch.equal(t[f"{name}.v_scale"], scale_from_amax(v).half())


def test_load_quantizes_the_cache_with_the_stored_scales(kv_checkpoints):
    kv, plain = load(kv_checkpoints / "kv"), load(kv_checkpoints / "plain")
    assert kv.config._attn_implementation == "quantkit-kv|sdpa"
    assert float(kv.model.layers[1].self_attn.v_scale) > 0
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = kv(ids).logits, plain(ids).logits
        kv.config._attn_implementation = "sdpa"  # the same model, its cache left in float
        c = kv(ids).logits
    assert torch.equal(c, b) and not torch.equal(a, b) and float((a - b).abs().max()) < 0.1


def test_eval_scores_the_quantized_cache_and_reports_its_bytes(kv_checkpoints, tiny_llama, text_file, tmp_path):
    from quantkit.eval.report import markdown
    from quantkit.eval.runner import evaluate_paths

    res = evaluate_paths([str(kv_checkpoints / "plain"), str(kv_checkpoints / "kv")], base=str(tiny_llama),
                         dataset=str(text_file), seqlen=32, max_windows=2, cache=False, cache_root=tmp_path / "c",
                         context=4096)
    rows = {r["label"]: r for r in res["rows"]}
    assert res["protocol"]["context"] == 4096
    assert "FP8 dyn KV-fp8" in rows["kv"]["method"] and rows["kv"]["format"].endswith("KV fp8 per tensor")
    assert rows["plain"]["kv_bytes_per_token"] == 256 and rows["kv"]["kv_bytes_per_token"] == 128
    assert rows["kv"]["kl"] != rows["plain"]["kl"]  # scored with the cache quantized
    from quantkit.formats.stats import tensor_entries

    stored = sum(e.nbytes for e in tensor_entries(kv_checkpoints / "kv").values())
    assert rows["kv"]["context_bytes"] == stored + 128 * 4096
    table = markdown(res)
    assert "KV B/tok" in table and "mem@ctx MB" in table and "at 4096 tokens" in table
    assert all(len(line) <= 80 for t in __import__("quantkit.eval.report", fromlist=["x"]).rich_tables(res, 80)
               for line in _render(t))


def _render(table):
    from rich.console import Console

    console = Console(width=80, record=True)
    with console.capture():
        console.print(table)
    return console.export_text().splitlines()


def test_same_inputs_give_byte_identical_kv_checkpoints(tiny_llama, text_file, tmp_path):
    for name in ("a", "b"):
        api.quantize(str(tiny_llama), "gptq", tmp_path / name, scheme=make_scheme("fp8", kv_cache="fp8"),
                     calib=calib(text_file), device="cpu")
    for f in ("model.safetensors", "config.json", "quantkit.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# ---------------------------------------------------------------- command line


def test_cli_round_trip(tiny_llama, text_file, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(tiny_llama), "-o", str(out), "-m", "smoothquant-rtn", "--preset", "w8a8",
                            "--kv-cache", "fp8", "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "32",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]["type"] == "float"
    r = runner.invoke(app, ["eval", str(out), "--base", str(tiny_llama), "--dataset", str(text_file), "--seqlen", "32",
                            "--max-windows", "2", "--no-cache", "--context", "1000", "--json", "-"])
    assert r.exit_code == 0, r.output
    rows = {row["label"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["q"]["kv_bytes_per_token"] == 128 and rows["q"]["context_bytes"] > 128 * 1000


@pytest.mark.parametrize("args,needle", [
    (["--preset", "w4g64", "-m", "gptq", "--kv-cache", "fp8"], "the gptq format has no KV-cache scheme"),
    (["-m", "awq", "--kv-cache", "fp8"], "the awq format has no KV-cache scheme"),
    (["--preset", "w8a8", "--kv-cache", "int8"], "--kv-cache int8 is not a cache type"),
])
def test_cli_refusals_are_one_line(tiny_llama, tmp_path, args, needle):
    assert_quantize_refused(tiny_llama, tmp_path / "o", args, needle)


def test_cli_refuses_an_attention_it_cannot_hook(tiny_llama, tmp_path, monkeypatch):
    """An architecture whose attention does not call transformers' attention interface: one line, exit 2, before
    any weight is quantized."""
    import quantkit.models.kvcache as kvcache

    monkeypatch.setattr(kvcache.inspect, "getsource", lambda obj: "def forward(self, x): return own_attention(x)")
    r = runner.invoke(app, ["quantize", str(tiny_llama), "-o", str(tmp_path / "o"), "--preset", "w8a8",
                            "--kv-cache", "fp8"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot hook its keys and values" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- every dense architecture of the table


@pytest.mark.parametrize("arch", ["Gemma3ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "OPTForCausalLM",
                                  "MistralForCausalLM", "Gemma2ForCausalLM", "Qwen2ForCausalLM"])
def test_every_table_architecture_is_hooked(arch, text_file, tmp_path):
    """Sliding-window layers (Gemma), q/k norms (Qwen3, Gemma3), a fused qkv_proj (Phi-3) and no RoPE at all (OPT):
    every decoder block's attention gets measured scales and computes with the FP8 cache after load."""
    from tests.tiny import make_model
    from tests.unit.test_arch import _config

    src = make_model(tmp_path / "m", _config(arch))
    api.quantize(str(src), "rtn", tmp_path / "q", scheme=make_scheme("w8a8", kv_cache="fp8"),
                 calib=calib(text_file, n=2), device="cpu")
    model = load(tmp_path / "q")
    attn = attention_modules(model, get_blocks(model, get_arch(model)))
    assert len(attn) == model.config.num_hidden_layers
    assert all(float(m.k_scale) > 0 and float(m.v_scale) > 0 for m in attn.values())
    ids = torch.randint(3, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(ids).logits
        model.config._attn_implementation = model.config._attn_implementation.removeprefix("quantkit-kv|")
        b = model(ids).logits
    assert not torch.equal(a, b)
