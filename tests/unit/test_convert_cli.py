"""`quantkit convert` through the CLI: the table, a verified conversion, and bad inputs (one line, exit 2, nothing left)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.api import quantize
from quantkit.cli.main import app
from tests.unit.test_convert_repack import with_act_order

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, needle: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temporary output was left behind"


@pytest.fixture(scope="module")
def ckpts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    quantize(tiny_llama, "rtn", root / "w4", scheme={"bits": 4, "group_size": 32}, device="cpu")
    quantize(tiny_llama, "rtn", root / "w3", scheme={"bits": 3, "group_size": 32}, device="cpu")
    return {"fp": tiny_llama, "w4": root / "w4", "w3": root / "w3", "root": root}


def test_list_prints_the_table():
    r = run("convert", "--list", "--json", "-")
    assert r.exit_code == 0, r.output
    table = json.loads(r.stdout)
    kinds = {(t["from"], t["to"]): t["kind"] for t in table}
    assert kinds["gptq", "awq"] == "exact" and kinds["hf", "gguf"] == "lossy"


def test_verified_exact_conversion(ckpts, tmp_path):
    out = tmp_path / "awq"
    r = run("convert", ckpts["w4"], out, "--to", "awq", "--verify", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert "verify: max |dlogit| 0," in r.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["kind"] == "exact" and summary["verify"]["max_abs_logit"] == 0.0
    assert summary["verify"]["top1"] == 1.0


def test_unknown_format(ckpts, tmp_path):
    assert_refused(run("convert", ckpts["w4"], tmp_path / "o", "--to", "exl2"), "unknown target format", tmp_path / "o")


def test_missing_pair_names_closest_path(ckpts, tmp_path):
    assert_refused(run("convert", ckpts["fp"], tmp_path / "o", "--to", "awq"), "quantkit quantize", tmp_path / "o")


def test_unsupported_architecture_for_gguf(tmp_path):
    from transformers import OPTConfig

    from tests.tiny import make_model

    opt = make_model(tmp_path / "opt", OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                                 num_attention_heads=4, max_position_embeddings=64,
                                                 word_embed_proj_dim=64, architectures=["OPTForCausalLM"]))
    out = tmp_path / "o.gguf"
    assert_refused(run("convert", opt, out, "--to", "gguf"), "does not support OPTForCausalLM", out)


def test_act_order_to_awq(ckpts, tmp_path):
    src = with_act_order(ckpts["w4"], tmp_path / "actorder")
    out = tmp_path / "o"
    assert_refused(run("convert", src, out, "--to", "awq"), "act-order", out)


def test_three_bits_to_q4_0(ckpts, tmp_path):
    out = tmp_path / "o.gguf"
    assert_refused(run("convert", ckpts["w3"], out, "--to", "gguf", "--type", "q4_0"), "3-bit", out)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    out = tmp_path / "o"
    assert_refused(run("convert", bad, out, "--to", "hf"), "bad.gguf is damaged or truncated", out)


def test_truncated_safetensors(ckpts, tmp_path):
    src = tmp_path / "trunc"
    shutil.copytree(ckpts["w4"], src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    out = tmp_path / "o"
    assert_refused(run("convert", src, out, "--to", "compressed-tensors"), "truncated", out)


def test_gguf_output_needs_suffix(ckpts, tmp_path):
    out = tmp_path / "model"
    assert_refused(run("convert", ckpts["w4"], out, "--to", "gguf"), "must end in .gguf", out)


def test_existing_output_needs_force(ckpts, tmp_path):
    out = tmp_path / "o"
    assert run("convert", ckpts["w4"], out, "--to", "gptq-v2").exit_code == 0
    r = run("convert", ckpts["w4"], out, "--to", "gptq-v2")
    assert r.exit_code == 2 and "--force" in r.stderr
    assert run("convert", ckpts["w4"], out, "--to", "gptq-v2", "--force").exit_code == 0


def test_quiet_prints_nothing(ckpts, tmp_path):
    r = run("convert", ckpts["w4"], tmp_path / "o", "--to", "awq", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr.strip() == ""


@pytest.mark.parametrize("to,name", [("awq", "o"), ("gguf", "o.gguf"), ("hf", "o")])
def test_progress_counts_every_tensor_written(ckpts, tmp_path, to, name):
    from quantkit.convert import convert

    calls = []
    convert(ckpts["w4"], to, tmp_path / name, gguf_type="q4_0" if to == "gguf" else "f16",
            progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert calls and all(stage == "tensors" for stage, _, _ in calls)
    totals = {total for _, _, total in calls}
    assert len(totals) == 1
    assert [done for _, done, _ in calls] == list(range(1, totals.pop() + 1))
