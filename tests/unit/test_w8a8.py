"""Weight-and-activation schemes (W8A8, FP8): the scheme, the grids, GPTQ on FP8, the compressed-tensors
int-/float-quantized checkpoint and its load, and the CLI's one-line refusals."""

import json

import pytest
import torch
from typer.testing import CliRunner

from quantkit import api
from quantkit.cli.main import app
from tests.tiny import assert_quantize_refused
from quantkit.errors import SchemeError
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import FP8_DTYPE, FP8_MAX, int8_activations, quantize_activations, quantize_weight, rtn_quantize
from quantkit.loading import load
from quantkit.methods.gptq.algorithm import GPTQParams, gptq_quantize
from quantkit.scheme import PRESETS, ActivationScheme, QuantScheme, make_scheme

ACT_PRESETS = ("w8a8", "w8a8-static", "fp8-dynamic", "fp8")


def calib(text_file):
    return dict(dataset=str(text_file), nsamples=4, seqlen=32, batch_size=2)


# ---------------------------------------------------------------- scheme


@pytest.mark.parametrize("name", ACT_PRESETS)
def test_activation_presets_are_valid(name):
    s = make_scheme(name)
    assert s.input_activations is not None and s.bits == 8 and s.sym and s.group_size == -1
    assert s.type == s.input_activations.type == ("float" if name.startswith("fp8") else "int")
    assert s.activation_static == (name in ("w8a8-static", "fp8"))
    assert s.weight_strategy == ("tensor" if name == "fp8" else "channel")


@pytest.mark.parametrize("overrides,needle", [
    ({"bits": 4}, "--bits 4 conflicts"),
    ({"group_size": 64}, "--group-size 64 conflicts"),
    ({"sym": False}, "--asym conflicts"),
])
def test_activation_preset_with_conflicting_weight_options_is_one_line(overrides, needle):
    with pytest.raises(SchemeError) as e:
        make_scheme("w8a8", **overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fields,needle", [
    ({"strategy": "token", "dynamic": False}, "token needs dynamic"),
    ({"strategy": "tensor", "dynamic": True}, "per token"),
    ({"strategy": "channel", "dynamic": False}, "per tensor"),
    ({"symmetric": False}, "symmetric"),
])
def test_activation_scheme_validation(fields, needle):
    with pytest.raises(ValueError, match=needle):
        ActivationScheme(**fields)


def test_weight_and_activation_types_must_agree_and_fp8_is_per_channel():
    with pytest.raises(SchemeError, match="float activations need float weights"):
        make_scheme(None, bits=8, group_size=-1, sym=True, input_activations={"type": "float"})
    with pytest.raises(SchemeError, match="FP8"):
        make_scheme(None, bits=8, group_size=64, sym=True, type="float")
    with pytest.raises(SchemeError, match="8-bit activations"):
        make_scheme(None, bits=4, group_size=-1, sym=True, input_activations={})
    assert QuantScheme().input_activations is None  # weight-only by default


# ---------------------------------------------------------------- grids and activation maths


def test_fp8_weights_are_e4m3_values_on_a_per_channel_scale():
    w = torch.randn(48, 96) * torch.linspace(0.1, 3, 48)[:, None]
    qw = quantize_weight(w, 8, -1, True, "float")
    assert qw.codes.dtype == FP8_DTYPE and qw.is_float and bool((qw.zeros == 0).all())
    assert torch.equal(qw.scales, (w.abs().amax(1, keepdim=True) / FP8_MAX).half().float())
    deq = qw.dequantize()
    assert torch.equal(deq, qw.scales * qw.codes.float())
    assert float(((deq - w).abs() / w.abs().amax(1, keepdim=True)).max()) < 2 ** -4  # e4m3: 3 mantissa bits
    per_tensor = quantize_weight(w, 8, -1, True, "float", per_tensor=True)
    assert per_tensor.scales.unique().numel() == 1


def test_int8_per_channel_grid_is_compressed_tensors_symmetric_minmax():
    w = torch.randn(32, 64)
    qw = quantize_weight(w, 8, -1, True)
    # compressed-tensors: scale = max|w| / 127.5, q = round(w / scale) in [-128, 127]
    scale = (w.abs().amax(1, keepdim=True) / 127.5).half().float()
    assert torch.equal(qw.scales, scale)
    assert torch.equal(qw.codes.long() - 128, torch.round(w / scale).clamp(-128, 127).long())


@pytest.mark.parametrize("number,qmax", [("int", 127.5), ("float", FP8_MAX)])
def test_dynamic_activations_are_per_token(number, qmax):
    x = torch.randn(5, 64) * torch.tensor([0.01, 1, 10, 100, 0])[:, None]
    y = quantize_activations(x, number)
    scale = x.abs().amax(1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    q = torch.round(x / scale).clamp(-128, 127) if number == "int" else (x / scale).to(FP8_DTYPE).float()
    assert torch.equal(y, q * scale)
    assert bool((y[4] == 0).all())


def test_int8_codes_are_what_fake_quantization_multiplies():
    x = torch.randn(7, 64)
    q, s = int8_activations(x)
    assert q.dtype == torch.int8
    assert torch.equal(q.float() * s, quantize_activations(x, "int"))
    static = torch.tensor([0.02])
    q, s = int8_activations(x, static)
    assert torch.equal(q.float() * s, quantize_activations(x, "int", static))


def test_gptq_error_feedback_works_on_the_fp8_grid():
    torch.manual_seed(1)
    x = torch.randn(2048, 64) @ torch.randn(64, 64)  # correlated inputs
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(32, 64) * 4
    params = GPTQParams(bits=8, group_size=-1, sym=True, number="float")
    res = gptq_quantize(w, h, params)
    assert res.weight.is_float and not res.fallback
    rtn = quantize_weight(w, 8, -1, True, "float")

    def err(qw):
        d = qw.dequantize() - w
        return float(torch.einsum("oi,ij,oj->", d, h, d))

    assert err(res.weight) < 0.8 * err(rtn)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("preset,method", [("w8a8", "rtn"), ("fp8-dynamic", "rtn"), ("w8a8-static", "gptq"),
                                           ("fp8", "gptq")])
def test_checkpoint_layout_and_load(tiny_llama, text_file, tmp_path, preset, method):
    out = tmp_path / "q"
    api.quantize(str(tiny_llama), method, out, scheme=preset, calib=calib(text_file), device="cpu")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = make_scheme(preset)
    assert qc["format"] == ("float-quantized" if scheme.type == "float" else "int-quantized")
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == scheme.weight_strategy and group["weights"]["type"] == scheme.type
    act = group["input_activations"]
    assert (act["type"], act["strategy"], act["dynamic"]) == (scheme.type, scheme.input_activations.strategy,
                                                             not scheme.activation_static)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        w = fh.get_tensor("model.layers.0.mlp.down_proj.weight")
        s = fh.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert w.dtype == (FP8_DTYPE if scheme.type == "float" else torch.int8) and w.shape == (64, 128)
    assert s.shape == ((1,) if scheme.weight_strategy == "tensor" else (64, 1)) and s.dtype == torch.float16
    assert ("model.layers.0.mlp.down_proj.input_scale" in keys) == scheme.activation_static
    assert not any(k.endswith("zero_point") for k in keys)

    model = load(out)
    lin = model.model.layers[0].mlp.down_proj
    assert isinstance(lin, QuantLinear) and lin.act == scheme.input_activations
    ids = torch.randint(0, 320, (1, 24))
    with torch.no_grad():
        logits = model(ids).logits
        dense = load(out, kernel="dense")(ids).logits
        for m in model.modules():  # the same weights without activation quantization: a different output
            if isinstance(m, QuantLinear):
                m.act = None
        weight_only = model(ids).logits
    assert torch.equal(logits, dense)  # the dense kernel quantizes activations exactly as the reference does
    assert not torch.equal(logits, weight_only)


def test_same_inputs_give_byte_identical_w8a8_checkpoints(tiny_llama, text_file, tmp_path):
    for name in ("a", "b"):
        api.quantize(str(tiny_llama), "gptq", tmp_path / name, scheme="fp8", calib=calib(text_file), device="cpu")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_weight_only_kernels_refuse_activation_layers():
    from quantkit.kernels.base import LayerSpec
    from quantkit.kernels.registry import KERNELS

    spec = LayerSpec(64, 128, 8, -1, True, "trivial", "cpu", torch.float32, "int", "int-token")
    assert "weight-only" in KERNELS["cpu-int8"].check(spec)
    assert KERNELS["dense"].check(spec) is None
    fp8 = LayerSpec(64, 128, 8, -1, True, "trivial", "cpu", torch.float32, "float", "")
    assert "FP8" in KERNELS["cpu-int8"].check(fp8)


# ---------------------------------------------------------------- command line


runner = CliRunner()


@pytest.mark.parametrize("args,needle", [
    (["--preset", "w8a8", "--bits", "4"], "--bits 4 conflicts"),
    (["--preset", "w8a8", "-m", "awq-gptq"], "writes weight-only checkpoints"),
    (["--preset", "w8a8-static", "-m", "rtn"], "static activation scales"),
])
def test_cli_refusals_are_one_line(tiny_llama, tmp_path, args, needle):
    assert_quantize_refused(tiny_llama, tmp_path / "o", args, needle)


def test_convert_refuses_activation_checkpoints(tiny_llama, tmp_path):
    api.quantize(str(tiny_llama), "rtn", tmp_path / "q", scheme="w8a8", device="cpu")
    r = runner.invoke(app, ["convert", str(tmp_path / "q"), str(tmp_path / "o"), "--to", "gptq"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no weight-only equivalent" in lines[0]
    assert not (tmp_path / "o").exists()


def test_eval_says_how_activations_and_fp8_ran(tiny_llama, text_file, tmp_path):
    from quantkit.eval.runner import evaluate_paths

    for preset in ("w8a8", "fp8-dynamic"):
        api.quantize(str(tiny_llama), "rtn", tmp_path / preset, scheme=preset, device="cpu")
    res = evaluate_paths([str(tmp_path / "w8a8"), str(tmp_path / "fp8-dynamic")], base=str(tiny_llama),
                         dataset=str(text_file), seqlen=32, max_windows=2, cache=False, cache_root=tmp_path / "c")
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["w8a8"]["method"] == "rtn W8A8 int8 dyn" and rows["w8a8"]["kernels"] == {"w8a8-int8": 14}
    assert rows["w8a8"]["scored_with"] == "dense" and rows["w8a8"]["kl"] > 0  # the exact maths, activations quantized
    assert rows["fp8-dynamic"]["method"] == "rtn FP8 dyn (dequantized: no FP8 kernel here)"
    assert rows["w8a8"]["format"] == "compressed-tensors int-quantized, A8 int8 per token"
