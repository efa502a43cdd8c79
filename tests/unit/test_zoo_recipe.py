"""Recipes: one-line validation errors with the YAML path, and `quantize --recipe` with flag overrides."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.zoo.config import load_zoo
from quantkit.zoo.recipe import RECIPE_FILE, RecipeError, load_recipe

runner = CliRunner()


def write(path, data):
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data, needle", [
    ({"method": "rtn", "calibration": {"nsamples": 0}}, "calibration.nsamples: Input should be greater than or equal to 1"),
    ({"method": "rtn", "calibration": {"nsample": 4}}, "calibration.nsample: unknown key"),
    ({"method": "rtn", "colour": "red"}, "colour: unknown key"),
    ({"model": "x"}, "method: required key is missing"),
    ({"method": "magic"}, "method: unknown method 'magic'"),
    ({"method": "rtn", "preset": "w9"}, "preset: unknown preset 'w9'"),
    ({"method": "rtn", "scheme": {"bits": 5}}, "scheme.bits: Input should be 2, 3, 4 or 8"),
    ({"method": "rtn", "scheme": {"group_size": 48}}, "scheme.group_size: group_size must be a multiple of 32"),
    ({"method": "gptq", "options": {"damp": 2.0}}, "options.damp: Input should be less than or equal to 1"),
    ({"method": "gptq", "options": {"n_grid": 3}}, "options.n_grid: unknown key"),
    ({"method": "rtn", "gates": {"min_top1": 101}}, "gates.min_top1: Input should be less than or equal to 100"),
    ("method: [rtn\n", "invalid YAML"),
    ("- rtn\n", "expected a mapping"),
])
def test_recipe_errors_are_one_line_with_the_key_path(tmp_path, data, needle):
    path = write(tmp_path / "r.yaml", data)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ") and needle in msg, msg
    assert "\n" not in msg


def test_zoo_errors_name_the_recipe_file_or_the_zoo_key(tmp_path):
    write(tmp_path / "bad.yaml", {"method": "rtn", "calibration": {"seqlen": 2}})
    zoo = write(tmp_path / "zoo.yaml", {"models": [{"model": "m", "recipes": ["bad.yaml"]}]})
    with pytest.raises(RecipeError, match=r"bad\.yaml: calibration\.seqlen: Input should be greater than or equal to 8"):
        load_zoo(zoo)
    write(zoo, {"models": [{"model": "m", "recipes": ["rtn:w4g64", {"method": "gptq", "options": {"damp": -1}}]}]})
    with pytest.raises(RecipeError, match=r"zoo\.yaml: models\.0\.recipes\.1\.options\.damp: "):
        load_zoo(zoo)
    write(zoo, {"models": [{"model": "m", "recipes": ["rtn:w4g64", "rtn:w4g64"]}]})
    with pytest.raises(RecipeError, match="entry name m-rtn-w4g64 is already used"):
        load_zoo(zoo)
    write(zoo, {"models": [{"model": "m", "recipes": []}]})
    with pytest.raises(RecipeError, match="models.0.recipes: "):
        load_zoo(zoo)


def test_zoo_expansion_names_gates_and_layers(tmp_path):
    write(tmp_path / "g.yaml", {"name": "g", "method": "gptq", "preset": "w4g64",
                                "calibration": {"nsamples": 64}, "gates": {"max_kl": 0.2}})
    zoo = write(tmp_path / "zoo.yaml", {
        "defaults": {"calibration": {"nsamples": 128, "seqlen": 256}, "gates": {"max_kl": 1.0, "min_top1": 50}},
        "overrides": {"evaluation": {"max_windows": 8}},
        "models": [{"model": "org/Some-Model", "gates": {"min_top1": 60},
                    "recipes": ["g.yaml", "nf4", {"recipe": "g.yaml", "name": "g16", "calibration": {"nsamples": 16}}]}],
    })
    e = {x.name: x for x in load_zoo(zoo)}
    assert list(e) == ["some-model-g", "some-model-nf4", "some-model-g16"]
    g = e["some-model-g"]
    assert g.recipe.calibration.nsamples == 64 and g.recipe.calibration.seqlen == 256  # recipe over defaults
    assert g.recipe.evaluation.max_windows == 8  # overrides over the recipe
    assert g.gates.max_kl == 0.2 and g.gates.min_top1 == 60  # recipe > model > defaults, per key
    assert e["some-model-g16"].recipe.calibration.nsamples == 16
    assert g.base_model == "org/Some-Model" and g.recipe.model == "org/Some-Model"
    # what does not change the artifact does not change the fingerprint
    assert e["some-model-g"].recipe.canonical() != e["some-model-g16"].recipe.canonical()
    assert g.recipe.canonical() == g.recipe.model_copy(update={"name": "x", "description": "y"}).canonical()


def test_quantize_recipe_with_flag_overrides(tiny_llama, text_file, tmp_path):
    recipe = write(tmp_path / "r.yaml", {
        "model": str(tiny_llama), "method": "gptq", "scheme": {"bits": 8, "group_size": 32, "sym": True},
        "options": {"damp": 0.05, "block_size": 32},
        "calibration": {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "seed": 3}})
    out = tmp_path / "o"
    r = runner.invoke(app, ["quantize", "--recipe", str(recipe), "--group-size", "64", "--seed", "5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "quantkit.json").read_text())
    assert prov["method"] == "gptq"
    assert prov["scheme"]["bits"] == 8 and prov["scheme"]["sym"] is True  # from the recipe
    assert prov["scheme"]["group_size"] == 64  # the flag wins
    assert prov["options"]["damp"] == 0.05 and prov["options"]["block_size"] == 32
    rec = load_recipe(out / RECIPE_FILE)  # the checkpoint records what it was made with
    assert rec.method == "gptq" and rec.quant_scheme().group_size == 64 and rec.quant_scheme().bits == 8
    assert rec.calibration.seed == 5 and rec.calibration.nsamples == 4 and rec.options["damp"] == 0.05
    assert rec.model == str(tiny_llama)
    # the recorded recipe reproduces the checkpoint byte for byte
    again = tmp_path / "again"
    r = runner.invoke(app, ["quantize", "--recipe", str(out / RECIPE_FILE), "-o", str(again)])
    assert r.exit_code == 0, r.output
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_quantize_recipe_method_and_preset_flags_take_their_sections(tiny_llama, tmp_path):
    recipe = write(tmp_path / "r.yaml", {"model": str(tiny_llama), "method": "gptq", "preset": "w4g64",
                                         "scheme": {"group_size": 32}, "options": {"damp": 0.05}})
    out = tmp_path / "o"
    r = runner.invoke(app, ["quantize", "--recipe", str(recipe), "-m", "rtn", "--preset", "w8", "-o", str(out)])
    assert r.exit_code == 0, r.output  # gptq's damp is dropped with --method rtn, group 32 with --preset w8
    prov = json.loads((out / "quantkit.json").read_text())
    assert prov["method"] == "rtn" and prov["scheme"]["bits"] == 8 and prov["scheme"]["group_size"] == -1


def test_quantize_recipe_errors(tmp_path):
    r = runner.invoke(app, ["quantize", "--recipe", str(write(tmp_path / "r.yaml", {"method": "rtn"})), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "model: the recipe names no model" in r.stderr
    r = runner.invoke(app, ["quantize", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "give MODEL" in r.stderr
    bad = write(tmp_path / "b.yaml", {"method": "rtn", "calibration": {"nsamples": -1}})
    r = runner.invoke(app, ["quantize", "--recipe", str(bad), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr.strip() == (
        f"error: {bad}: calibration.nsamples: Input should be greater than or equal to 1")


def test_executor_choice():
    import importlib.util

    from quantkit.errors import QuantkitError
    from quantkit.zoo.executors import LocalExecutor, ProcessExecutor, make_executor

    assert isinstance(make_executor("local", 1), LocalExecutor)
    assert isinstance(make_executor("local", 3), ProcessExecutor) and make_executor("local", 3).jobs == 3
    with pytest.raises(QuantkitError, match="unknown executor 'slurm'"):
        make_executor("slurm")
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(QuantkitError, match=r"needs Ray: pip install 'quantkit\[ray\]'"):
            make_executor("ray")
