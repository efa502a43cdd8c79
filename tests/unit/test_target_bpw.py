"""Per-module grids end to end on a tiny model: the scheme's overrides, RTN and GPTQ quantizing each Linear on
its own grid, the GPTQ `dynamic` config written and read back, and `--target-bpw` from the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import quantkit
from quantkit.api import quantize
from quantkit.errors import SchemeError
from quantkit.formats.dynamic import DynamicGrids, dynamic_config, module_key
from quantkit.formats.qlinear import QuantLinear
from quantkit.formats.stats import checkpoint_stats
from quantkit.scheme import ModuleGrid, QuantScheme, make_scheme
from tests.tiny import assert_quantize_refused

OVERRIDES = {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 64},
             "model.layers.1.self_attn.q_proj": {"bits": 4, "group_size": 32},
             "model.layers.1.self_attn.k_proj": {"bits": 8, "group_size": 32}}


def _calib(text_file) -> dict:
    return {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}


def _grids(model) -> dict[str, tuple[int, int]]:
    return {n: (m.bits, m.group_size) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_scheme_overrides_validate_and_leave_plain_schemes_unchanged():
    plain = make_scheme("w4g64")
    assert "overrides" not in plain.model_dump()  # fingerprints of schemes without overrides do not move
    s = make_scheme("w4g64", overrides=OVERRIDES)
    assert s.grid_of("model.layers.0.mlp.down_proj") == ModuleGrid(bits=8, group_size=64)
    assert s.grid_of("model.layers.0.mlp.up_proj") == ModuleGrid(bits=4, group_size=64)
    assert list(s.model_dump()["overrides"]) == sorted(OVERRIDES)
    with pytest.raises(SchemeError, match="overrides"):
        make_scheme("w4g64", overrides={"x": {"bits": 5, "group_size": 64}})
    with pytest.raises(SchemeError, match="integer weight-only"):
        make_scheme("w8a8", overrides={"x": {"bits": 8, "group_size": 64}})
    with pytest.raises(SchemeError, match="no such quantized Linear"):
        s.check_layers({"model.layers.0.mlp.up_proj": (128, 64)})
    shapes = {n: (64, 64) for n in OVERRIDES}
    with pytest.raises(SchemeError, match="per-module group_size 64 does not divide in_features 32"):
        make_scheme("w4g32", overrides={"a": {"bits": 8, "group_size": 64}}).check_layers({"a": (64, 32)})
    s.check_layers(shapes)


def test_dynamic_config_keys_match_exactly_and_first_rule_wins():
    s = QuantScheme(bits=4, group_size=64, overrides={"model.layers.1.mlp.up_proj": {"bits": 8, "group_size": 64},
                                                       "model.layers.0.mlp.up_proj": {"bits": 4, "group_size": 64}})
    dyn = dynamic_config(s)  # the override equal to the base grid is not written
    assert dyn == {module_key("model.layers.1.mlp.up_proj"): {"bits": 8, "group_size": 64}}
    assert module_key("model.layers.1.mlp.up_proj") == "+:^model\\.layers\\.1\\.mlp\\.up_proj$"
    grids = DynamicGrids(dyn, ModuleGrid(bits=4, group_size=64))
    assert grids.grid("model.layers.1.mlp.up_proj") == ModuleGrid(bits=8, group_size=64)
    assert grids.grid("model.layers.11.mlp.up_proj") == ModuleGrid(bits=4, group_size=64)  # anchored
    mixed = DynamicGrids({"-:.*lm_head": {}, r"+:.*\.down_proj": {"bits": 8}, r".*": {"group_size": 32}},
                         ModuleGrid(bits=4, group_size=128))
    assert mixed.grid("lm_head") is None
    assert mixed.grid("model.layers.0.mlp.down_proj") == ModuleGrid(bits=8, group_size=128)
    assert mixed.grid("model.layers.0.mlp.up_proj") == ModuleGrid(bits=4, group_size=32)


# SignRound tunes each Linear's rounding and clipping on its own grid, then the end-to-end stage its scales
_OPTIONS = {"rtn": None, "gptq": None,
            "signround": {"iters": 3, "e2e_steps": 2, "calib_dtype": "float32", "compile": "auto"}}


@pytest.mark.parametrize("method", ["rtn", "gptq", "signround"])
def test_overrides_round_trip_through_the_gptq_dynamic_config(tiny_llama, text_file, tmp_path, method):
    out = tmp_path / method
    quantize(tiny_llama, method, out, scheme={"bits": 4, "group_size": 64, "overrides": OVERRIDES},
             calib=_calib(text_file), options=_OPTIONS[method], device="cpu")
    if method == "signround":  # compile auto is off for per-module grids (a graph per block's mix of bits)
        assert json.loads((out / "quantkit.json").read_text())["options"]["compile_used"] is False
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (4, 64)
    assert qc["dynamic"] == {module_key(n): g for n, g in sorted(OVERRIDES.items())}
    assert json.loads((out / "quantize_config.json").read_text())["dynamic"] == qc["dynamic"]
    model = quantkit.load(out)
    grids = _grids(model)
    assert len(grids) == 14
    for name, (bits, gs) in grids.items():
        want = OVERRIDES.get(name, {"bits": 4, "group_size": 64})
        assert (bits, gs) == (want["bits"], want["group_size"]), name
    # the 8-bit Linear uses the 8-bit range of codes, the 4-bit ones stay within 16
    assert int(model.get_submodule("model.layers.0.mlp.down_proj").quantized().codes.max()) > 15
    assert int(model.get_submodule("model.layers.0.mlp.up_proj").quantized().codes.max()) <= 15
    # bits per weight: every Linear's own grid counted
    stats = checkpoint_stats(out)
    from quantkit.budget.sensitivity import stored_bits
    want_bits = sum(stored_bits(m.out_features, m.in_features, ModuleGrid(bits=m.bits, group_size=m.group_size))
                    for m in model.modules() if isinstance(m, QuantLinear))
    assert stats["bits_per_weight"] == pytest.approx(want_bits / stats["quantized_params"])
    assert stats["quantized_params"] == sum(m.in_features * m.out_features for m in model.modules()
                                            if isinstance(m, QuantLinear))


def test_gptq_splits_a_stacked_group_by_grid_without_changing_its_other_rows(tiny_llama, text_file, tmp_path):
    """q/k/v share one Hessian: giving q_proj 8 bits leaves k_proj's and v_proj's codes as they were."""
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    quantize(tiny_llama, "gptq", plain, scheme={"bits": 4, "group_size": 32}, calib=_calib(text_file), device="cpu")
    quantize(tiny_llama, "gptq", mixed, scheme={"bits": 4, "group_size": 32, "overrides": {
        "model.layers.0.self_attn.q_proj": {"bits": 8, "group_size": 32}}}, calib=_calib(text_file), device="cpu")
    a, b = quantkit.load(plain), quantkit.load(mixed)
    for leaf in ("k_proj", "v_proj"):
        qa = a.get_submodule(f"model.layers.0.self_attn.{leaf}").quantized()
        qb = b.get_submodule(f"model.layers.0.self_attn.{leaf}").quantized()
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scales, qb.scales)
    q8 = b.get_submodule("model.layers.0.self_attn.q_proj")
    assert q8.bits == 8 and int(q8.quantized().codes.max()) > 15


def test_target_bpw_meets_the_budget_and_records_the_allocation(tiny_llama, text_file, tmp_path):
    out = tmp_path / "alloc"
    summary = quantize(tiny_llama, "gptq", out, scheme={"bits": 4, "group_size": 64}, calib=_calib(text_file),
                       device="cpu", target_bpw=6.0)
    alloc = summary["allocation"]
    stats = checkpoint_stats(out)
    assert stats["bits_per_weight"] <= 6.0
    assert stats["bits_per_weight"] == pytest.approx(alloc["bits_per_weight"])
    assert len(set(_grids(quantkit.load(out)).values())) > 1  # a mix, not one grid
    assert alloc["weighted_error"] <= min(alloc["uniform_weighted_error"][g] for g in ("w4g64", "w4g32"))
    record = json.loads((out / "quantkit.json").read_text())
    assert record["allocation"]["mix"] == alloc["mix"]
    assert record["scheme"]["overrides"]


def test_target_bpw_is_deterministic(tiny_llama, text_file, tmp_path):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    outs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        r = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(out), "--method", "gptq", "--quiet",
                                     "--target-bpw", "5.5", "--dataset", str(text_file), "--nsamples", "4",
                                     "--seqlen", "32", "--device", "cpu"])
        assert r.exit_code == 0, r.output
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and "model.safetensors" in files
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.parametrize("args, needle", [
    (["--target-bpw", "2.0"], "below the cheapest allocation"),
    (["--target-bpw", "30"], "above the costliest allocation"),
    (["--target-bpw", "5", "--target-grids", "w4g48"], "--target-grids"),
    (["--target-grids", "w4g64"], "--target-grids goes with --target-bpw"),
    (["--target-sensitivity", "fisher"], "--target-sensitivity goes with --target-bpw"),
    (["--target-bpw", "5", "--target-sensitivity", "hutchinson"], "--target-sensitivity: 'hutchinson'"),
    (["--target-bpw", "5", "--method", "awq"], "per-module grids need"),
])
def test_bad_targets_are_one_line_and_exit_2(tiny_llama, text_file, tmp_path, args, needle):
    assert_quantize_refused(tiny_llama, tmp_path / "out", ["--dataset", str(text_file), "--nsamples", "4",
                                                           "--seqlen", "32", "--method", "gptq", *args], needle)


def test_conversion_refuses_per_module_grids(tiny_llama, text_file, tmp_path):
    from quantkit.convert import convert
    from quantkit.errors import CheckpointError

    out = tmp_path / "mixed"
    quantize(tiny_llama, "rtn", out, scheme={"bits": 4, "group_size": 64, "overrides": OVERRIDES}, device="cpu")
    with pytest.raises(CheckpointError, match="per-module grids"):
        convert(out, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_schemes_with_overrides_hash_by_value():
    a = make_scheme("w4g64", overrides={"x": {"bits": 8, "group_size": 64}, "y": {"bits": 8, "group_size": 32}})
    b = make_scheme("w4g64", overrides={"y": {"bits": 8, "group_size": 32}, "x": {"bits": 8, "group_size": 64}})
    assert a == b and hash(a) == hash(b) and len({a, b, make_scheme("w4g64")}) == 2
