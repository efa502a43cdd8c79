"""SmoothQuant: the smoothing folds exactly, α is chosen by the block's measured output error (never worse than no
smoothing), the composed method writes a W8A8 checkpoint, and a bad α is one line with exit code 2."""

import json

import pytest
import torch
from typer.testing import CliRunner

from quantkit import api
from quantkit.calib.pipeline import run_sequential
from quantkit.cli.main import app
from quantkit.grid import quantize_activations, quantize_weight
from quantkit.loading import load
from quantkit.methods.composed import SmoothQuant
from quantkit.methods.smoothquant import smooth as sq
from quantkit.models.arch import get_arch
from quantkit.scheme import make_scheme


def _model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _samples():
    return torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))


def test_smoothing_scale_formula():
    act = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[1.0, -2.0, 0.5], [0.5, 1.0, -0.25]])
    s = sq.smoothing_scale(act, [w], 0.5)
    expect = torch.tensor([4.0, 1.0, 1e-5]).sqrt() / torch.tensor([1.0, 2.0, 0.5]).sqrt()
    assert torch.allclose(s, expect.clamp(min=1e-5))
    assert sq.alpha_grid(7) == (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def test_fixed_alpha_folds_exactly(tiny_llama):
    model = _model(tiny_llama)
    ids = _samples()
    with torch.no_grad():
        before = model(ids).logits
    spec = get_arch(model)
    cfg = sq.SmoothConfig(alpha=0.8, grid=(), score_tokens=64)
    chosen = []

    def per_block(calib):
        names = {n for n, m in calib.block.named_modules() if isinstance(m, torch.nn.Linear)}
        chosen.append(sq.smooth_block(calib, spec, names, make_scheme("w8a8"), cfg))
        return {}

    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    run_sequential(model, spec, ids, per_block, device=torch.device("cpu"), batch_size=2)
    assert chosen == [{"input_layernorm": 0.8, "post_attention_layernorm": 0.8, "mlp.up_proj": 0.8}] * 2
    assert not torch.equal(norm, model.model.layers[0].input_layernorm.weight)  # the scales were folded in
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_searched_alpha_is_never_worse_than_no_smoothing(tiny_llama):
    model = _model(tiny_llama)
    with torch.no_grad():  # an activation outlier channel, as LLMs have them: smoothing then pays
        model.model.layers[0].input_layernorm.weight[3] = 30.0
    spec = get_arch(model)
    scheme = make_scheme("w8a8")
    seen = {}

    def per_block(calib):
        names = {n for n, m in calib.block.named_modules() if isinstance(m, torch.nn.Linear)}
        mappings = sq.usable_mappings(calib.block, spec, names)
        sites = sq.collect(calib, mappings, 64, 0)
        for m in mappings:
            weights = [calib.block.get_submodule(n).weight for n in m.linears]
            seen[(calib.index, m.prev)] = sq.choose_alpha(sites[m.linears[0]], weights, scheme, sq.alpha_grid(4))
        return {}

    run_sequential(model, spec, _samples(), per_block, device=torch.device("cpu"), batch_size=2)
    assert len(seen) == 6
    for alpha, errors in seen.values():
        assert errors[alpha] == min(errors.values()) and set(errors) == {None, 0.3, 0.5, 0.7, 0.9}
    alpha, errors = seen[(0, "input_layernorm")]
    assert alpha is not None and errors[alpha] < 0.5 * errors[None]  # the outlier is smoothed, and it pays


def test_smoothquant_writes_a_w8a8_checkpoint(tiny_llama, text_file, tmp_path):
    out = tmp_path / "sq"
    api.quantize(str(tiny_llama), "smoothquant", out, scheme="w8a8",
                 calib=dict(dataset=str(text_file), nsamples=4, seqlen=32, batch_size=2), device="cpu")
    record = json.loads((out / "quantkit.json").read_text())
    assert record["steps"] == ["smooth", "gptq-rounding"] and record["method"] == "smoothquant"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    ids = _samples()
    with torch.no_grad():
        base, got = _model(tiny_llama)(ids).logits, load(out)(ids).logits
    assert float((base - got).abs().max()) < 0.05


def test_smoothquant_declares_activation_schemes():
    assert SmoothQuant.activation_schemes and SmoothQuant.static_activations
    assert {"smooth_alpha", "alpha_grid", "damp"} <= set(SmoothQuant.Options.model_fields)


@pytest.mark.parametrize("alpha", ["1.5", "-0.1"])
def test_bad_alpha_is_one_line(tiny_llama, tmp_path, alpha):
    r = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(tmp_path / "o"), "-m", "smoothquant",
                                 "--preset", "w8a8", "--smooth-alpha", alpha])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--smooth-alpha" in lines[0], r.stderr


def test_smoothquant_rtn_is_smoothing_then_round_to_nearest(tiny_llama, text_file, tmp_path):
    from quantkit.methods.composed import SmoothQuantRTN

    out = tmp_path / "sq-rtn"
    api.quantize(str(tiny_llama), "smoothquant-rtn", out, scheme="fp8-dynamic",
                 calib=dict(dataset=str(text_file), nsamples=4, seqlen=32, batch_size=2), device="cpu")
    record = json.loads((out / "quantkit.json").read_text())
    assert record["steps"] == ["smooth", "rtn-rounding"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"
    ids = _samples()
    with torch.no_grad():
        base, got = _model(tiny_llama)(ids).logits, load(out)(ids).logits
    assert float((base - got).abs().max()) < 0.1
    assert not SmoothQuantRTN.static_activations  # static scales need the GPTQ step's calibration pass


def test_smoothquant_rtn_refuses_static_presets(tiny_llama, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(tmp_path / "o"), "-m", "smoothquant-rtn",
                                 "--preset", "fp8"])
    assert r.exit_code == 2 and "static activation scales" in r.stderr


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-static"])
def test_alpha_scores_on_the_int8_product_match_the_float_product(preset):
    """The α search scores W8A8 candidates on the int8 codes' exact integer product (`torch._int_mm`); the error
    equals the float32 product of the dequantized operands to float32 rounding, for every candidate."""
    scheme = make_scheme(preset)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=g) * torch.rand(64, generator=g).mul(6).exp()  # outlier channels
    w = torch.randn(48, 64, generator=g) * 0.05
    amax, ref = x.abs().amax(0), x @ w.t()
    assert sq._integer_product(x, w, scheme)
    for alpha in (None, 0.3, 0.6, 0.9):
        s = None if alpha is None else sq.smoothing_scale(amax, [w], alpha)
        fast = sq.simulated_error(x, amax, w, ref, s, scheme)
        xs, ws, am = (x, w, amax) if s is None else (x / s, w * s, amax / s)
        qw = quantize_weight(ws, 8, -1, True)
        act = scheme.input_activations
        static = None if act.dynamic else (am.max() / act.qmax).clamp(min=1e-8).reshape(1)
        slow = float((quantize_activations(xs, "int", static) @ qw.dequantize().t() - ref).pow(2).mean())
        assert fast == pytest.approx(slow, rel=1e-5)
    # not an int8 product (FP8, or a width the int8 GEMM does not take): the float path, unchanged
    assert not sq._integer_product(x, w, make_scheme("fp8-dynamic"))
    assert not sq._integer_product(x[:, :60], w[:, :60], scheme)
    assert not sq._integer_product(x, w[:44], scheme)
