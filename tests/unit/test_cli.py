"""Every user error is one line on stderr and exit code 2 (through Typer's CliRunner)."""

import json

import pytest
from typer.testing import CliRunner

from quantkit.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def assert_user_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_missing_path(tmp_path):
    assert_user_error(run("quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o")), "not found")


def test_missing_gguf_file(tmp_path):
    assert_user_error(run("quantize", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "o")), "does not exist")


def test_bad_method(tiny_llama, tmp_path):
    assert_user_error(run("quantize", str(tiny_llama), "-m", "magic", "-o", str(tmp_path / "o")), "choose one of: ")


def test_bad_scheme(tiny_llama, tmp_path):
    r = run("quantize", str(tiny_llama), "--bits", "5", "-o", str(tmp_path / "o"))
    assert_user_error(r, "bits")
    r = run("quantize", str(tiny_llama), "--preset", "w4g128", "-o", str(tmp_path / "o"))
    assert_user_error(r, "does not divide in_features 64")
    assert not (tmp_path / "o").exists()


def test_unknown_preset(tiny_llama, tmp_path):
    assert_user_error(run("quantize", str(tiny_llama), "--preset", "w9", "-o", str(tmp_path / "o")), "unknown preset")


def test_option_for_another_method(tiny_llama, tmp_path):
    r = run("quantize", str(tiny_llama), "--damp", "0.1", "-o", str(tmp_path / "o"))
    assert_user_error(r, "--damp does not apply to method rtn")


def test_unreadable_dataset(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert_user_error(run("eval", str(tiny_llama), "--dataset", str(bad)), "cannot read dataset")
    assert_user_error(run("eval", str(tiny_llama), "--dataset", str(tmp_path / "none.txt")), "does not exist")


def test_output_exists(tiny_llama, tmp_path):
    out = tmp_path / "o"
    assert run("quantize", str(tiny_llama), "--preset", "w4g64", "-o", str(out), "-q").exit_code == 0
    assert_user_error(run("quantize", str(tiny_llama), "--preset", "w4g64", "-o", str(out)), "--force")
    assert run("quantize", str(tiny_llama), "--preset", "w4g64", "-o", str(out), "--force", "-q").exit_code == 0


def test_no_network_for_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_user_error(run("quantize", "some-org/some-model", "-o", str(tmp_path / "o")), "cannot fetch some-org/some-model")


def test_debug_shows_the_traceback(tmp_path):
    from quantkit.errors import QuantkitError

    r = run("--debug", "quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert r.exit_code != 0 and isinstance(r.exception, QuantkitError)


def test_json_summary_and_info(tiny_llama, tmp_path):
    out, js = tmp_path / "o", tmp_path / "s.json"
    r = run("quantize", str(tiny_llama), "--preset", "w4g64", "-o", str(out), "--json", str(js), "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads(js.read_text())
    assert summary["out"] == str(out) and summary["size_bytes"] > 0 and summary["quantize_seconds"] >= 0
    assert "model.safetensors" in summary["files"]
    r = run("info", str(out), "--json", "-")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["quantization_config"]["bits"] == 4 and info["tensor_count"] > 0 and info["size_bytes"] > 0
    assert 4.0 < info["bits_per_weight"] < 5.0


def test_methods_lists_calibration_needs():
    r = run("methods", "--json", "-")
    assert r.exit_code == 0
    rtn = next(m for m in json.loads(r.stdout) if m["name"] == "rtn")
    assert rtn["needs_calibration"] is False and rtn["description"]


def test_eval_table(tiny_llama, tmp_path, text_file):
    out = tmp_path / "o"
    run("quantize", str(tiny_llama), "--preset", "w4g64", "-o", str(out), "-q")
    r = run("eval", str(out), "--base", str(tiny_llama), "--dataset", str(text_file), "--seqlen", "64",
            "--max-windows", "3", "--json", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md"))
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "e.json").read_text())
    base, q = data["rows"]
    assert base["is_base"] and base["kl"] == pytest.approx(0, abs=1e-6) and base["top1"] == 100.0
    assert q["ppl"] > 0 and q["kl"] > 0
    assert "(base)" in (tmp_path / "e.md").read_text()


def test_eval_row_for_broken_checkpoint(tiny_llama, tmp_path, text_file):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64}, "model_type": "llama"}))
    args = ["eval", str(broken), str(tmp_path / "empty"), "--base", str(tiny_llama), "--dataset", str(text_file),
            "--seqlen", "64", "--max-windows", "2", "--json", "-", "-q"]
    (tmp_path / "empty").mkdir()
    r = run(*args)
    assert r.exit_code == 1, r.output  # every row is still reported (JSON), then the run fails
    rows = json.loads(r.stdout)["rows"]
    assert rows[1]["error"] and rows[2]["error"] == f"{tmp_path / 'empty'} has no config.json; is it a Hugging Face model folder?"
    assert r.stderr.splitlines() == [f"failed: broken: {rows[1]['error']}", f"failed: empty: {rows[2]['error']}",
                                     "error: 2 of 2 checkpoints failed (--keep-going to exit 0 anyway)"]
    r = run(*args, "--keep-going")
    assert r.exit_code == 0, r.output
    assert [json.loads(r.stdout)["rows"][i]["error"] for i in (1, 2)] == [rows[1]["error"], rows[2]["error"]]
    assert r.stderr.splitlines() == [f"failed: broken: {rows[1]['error']}", f"failed: empty: {rows[2]['error']}"]


def test_eval_table_when_stdout_is_not_a_terminal(tiny_llama, tmp_path, text_file):
    """Piped or in a CI log, the table is the Markdown one (no rich box cut to the pipe's 80 columns); a failed
    row says `failed` in its cell and its reason once, on one line of stderr."""
    (tmp_path / "empty").mkdir()
    r = run("eval", str(tiny_llama), str(tmp_path / "empty"), "--base", str(tiny_llama), "--dataset",
            str(text_file), "--seqlen", "64", "--max-windows", "2", "--keep-going")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "| model | method | bits/w | all bits/w | size MB | mem MB | ppl | Δppl % | KL | top-1 % |"
    assert lines[2].startswith("| llama (base) | float | 32.00 |") and "…" not in r.stdout and "┃" not in r.stdout
    assert lines[4].startswith("| empty | - | failed: ")
    reason = f"{tmp_path / 'empty'} has no config.json; is it a Hugging Face model folder?"
    err = r.stderr.splitlines()  # one line per checkpoint as it is scored; the failure's reason once
    assert [ln.split(":")[0] for ln in err] == ["✓ llama (base)", "✓ llama", "✗ empty"]
    assert err[2] == f"✗ empty: failed: {reason}" and r.stderr.count(reason) == 1


def test_scheme_flags_refused_for_fixed_format_methods(tiny_llama, tmp_path):
    r = run("quantize", str(tiny_llama), "-m", "nf4", "--bits", "4", "-o", str(tmp_path / "o"))
    assert_user_error(r, "--bits does not apply to method nf4")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--help"], ["quantize", "--help"], ["eval", "--help"], ["zoo", "--help"], ["convert", "--help"]])
def test_help_is_not_an_error(args):
    r = run(*args)
    assert r.exit_code == 0 and "internal error" not in r.output and "Usage" in r.output


def test_usage_error_exits_2():
    r = run("quantize")
    assert r.exit_code == 2 and "internal error" not in r.output


def test_quiet_prints_nothing(tiny_llama, text_file, tmp_path):
    """A subcommand's -q leaves errors only: no log lines, no progress, no summary."""
    args = ["quantize", str(tiny_llama), "-m", "gptq", "--preset", "w4g64", "--dataset", str(text_file),
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]
    loud = run("--verbose", *args, "-o", str(tmp_path / "p"))
    assert loud.exit_code == 0 and "GPTQ:" in loud.stderr and "wrote" in loud.output
    default = run(*args, "-o", str(tmp_path / "d"))  # quantkit's INFO lines only with --verbose
    assert default.exit_code == 0 and "GPTQ:" not in default.stderr and "wrote" in default.output
    r = run(*args, "-o", str(tmp_path / "o"), "-q")
    assert r.exit_code == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.output
