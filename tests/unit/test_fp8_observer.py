"""FP8 weight scales chosen for the least weight error (`observer="mse"`, fp8-dynamic's default): the search, the
scheme field, the checkpoint (the same float-quantized layout), GPTQ on the searched grid, the CLI flag."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from quantkit import api
from quantkit.cli.main import app
from quantkit.errors import SchemeError
from quantkit.grid import FP8_DTYPE, FP8_MAX, FP8_SEARCH_STEPS, fit_fp8, fp8_values, quantize_weight
from quantkit.methods.gptq.algorithm import GPTQParams, gptq_quantize
from quantkit.scheme import make_scheme


def _row_err(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (fp8_values(w, scale) * scale - w).square().sum(dim=1)


def _weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(64, 256) * torch.linspace(0.01, 2, 64)[:, None]


def test_mse_scale_is_the_best_fp16_candidate_and_never_clips():
    w = _weight()
    minmax = fit_fp8(w)
    mse = fit_fp8(w, observer="mse")
    assert mse.shape == (64, 1) and mse.dtype == torch.float32
    assert torch.equal(mse, mse.half().float())  # what the checkpoint stores: codes are chosen against it
    base = w.abs().amax(1, keepdim=True) / FP8_MAX
    cands = torch.cat([(base * (1 + k / FP8_SEARCH_STEPS)).half().float() for k in range(FP8_SEARCH_STEPS)], 1)
    errs = torch.stack([_row_err(w, cands[:, k:k + 1]) for k in range(FP8_SEARCH_STEPS)], 1)  # (64, K)
    assert torch.equal(cands[:, :1], minmax)
    assert torch.equal(_row_err(w, mse), errs.min(1).values)  # each row: the least error of the candidates
    assert bool((mse >= minmax).all())  # at or above max|w| / 448: the largest weight is not clipped
    assert bool((w.abs().amax(1, keepdim=True) / mse <= FP8_MAX * (1 + 2 ** -10)).all())  # fp16 rounding only
    # on Gaussian rows the search lowers the total squared error clearly (SmolLM2's Linears: 0.84x)
    assert float(_row_err(w, mse).sum()) < 0.9 * float(_row_err(w, minmax).sum())


def test_mse_per_tensor_scale_is_one_scale_no_worse_than_minmax():
    w = _weight()
    s = fit_fp8(w, per_tensor=True, observer="mse")
    assert s.shape == (64, 1) and s.unique().numel() == 1
    assert float(_row_err(w, s).sum()) <= float(_row_err(w, fit_fp8(w, per_tensor=True)).sum())
    with pytest.raises(ValueError, match="observer"):
        fit_fp8(w, observer="percentile")


def test_quantize_weight_codes_are_the_stored_scales_values():
    w = _weight()
    qw = quantize_weight(w, 8, -1, True, "float", observer="mse")
    assert qw.codes.dtype == FP8_DTYPE and torch.equal(qw.scales, fit_fp8(w, observer="mse"))
    assert torch.equal(qw.codes.float(), fp8_values(w, qw.scales))
    assert torch.equal(qw.dequantize(), qw.scales * qw.codes.float())
    assert not torch.equal(qw.scales, quantize_weight(w, 8, -1, True, "float").scales)


def test_scheme_observer_field():
    assert make_scheme("fp8-dynamic").observer == "mse"
    assert make_scheme("fp8-dynamic", observer="minmax").observer == "minmax"
    assert make_scheme("fp8").observer == "minmax"
    # the default is left out of the dump: the fingerprints of schemes without it do not change
    assert "observer" not in make_scheme("w8a8").model_dump()
    assert make_scheme("fp8-dynamic").model_dump()["observer"] == "mse"
    with pytest.raises(SchemeError, match="needs float"):
        make_scheme("w8a8", observer="mse")
    with pytest.raises(SchemeError, match="observer"):
        make_scheme("fp8-dynamic", observer="percentile")


def test_gptq_uses_the_searched_scales():
    torch.manual_seed(1)
    x = torch.randn(1024, 256)
    h = 2 * x.t() @ x / x.shape[0]
    w = _weight()
    res = gptq_quantize(w, h, GPTQParams(bits=8, group_size=-1, sym=True, number="float", observer="mse"))
    assert res.weight.is_float and torch.equal(res.weight.scales, fit_fp8(w, observer="mse"))


def test_fp8_dynamic_checkpoint_layout_is_unchanged(tiny_llama, text_file, tmp_path):
    calib = dict(dataset=str(text_file), nsamples=4, seqlen=32, batch_size=2)
    for obs in ("mse", "minmax"):
        api.quantize(str(tiny_llama), "rtn", tmp_path / obs, scheme=make_scheme("fp8-dynamic", observer=obs),
                     calib=calib, device="cpu")
    t = {obs: load_file(str(tmp_path / obs / "model.safetensors")) for obs in ("mse", "minmax")}
    assert {k: (v.dtype, v.shape) for k, v in t["mse"].items()} == {k: (v.dtype, v.shape) for k, v in t["minmax"].items()}
    name = "model.layers.0.mlp.down_proj"
    s = t["mse"][f"{name}.weight_scale"]
    assert s.dtype == torch.float16 and s.shape == (64, 1)
    assert not torch.equal(s, t["minmax"][f"{name}.weight_scale"])
    for obs in ("mse", "minmax"):
        group = json.loads((tmp_path / obs / "config.json").read_text())["quantization_config"]["config_groups"]
        weights = group["group_0"]["weights"]
        assert (weights["type"], weights["strategy"], weights["observer"]) == ("float", "channel", obs)


def test_cli_observer_flag(tiny_llama, text_file, tmp_path):
    res = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(tmp_path / "q"), "-m", "rtn", "--preset",
                                   "w8a8", "--observer", "mse", "--dataset", str(text_file)])
    assert res.exit_code == 2 and "needs float" in res.output
    res = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(tmp_path / "q"), "-m", "rtn", "--preset",
                                   "fp8-dynamic", "--observer", "minmax", "--dataset", str(text_file), "--nsamples", "4",
                                   "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    weights = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert weights["group_0"]["weights"]["observer"] == "minmax"
