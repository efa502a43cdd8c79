"""`quantkit info model.gguf`: architecture, tensor types and their share, bits per weight, tokenizer and
quantkit's provenance, from the header alone; --json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.convert import convert

runner = CliRunner()


@pytest.fixture(scope="module")
def q4_gguf(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("info") / "m.gguf"
    convert(tiny_llama, "gguf", path, gguf_type="q4_0")
    return path


def test_info_json_on_a_quantkit_gguf(q4_gguf):
    res = runner.invoke(app, ["info", str(q4_gguf), "--json", "-"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    tensors = GGUFReader(str(q4_gguf)).tensors  # the expectations, from the gguf package directly
    by_type: dict[str, list] = {}
    for t in tensors:
        by_type.setdefault(t.tensor_type.name, []).append(t)
    assert info["architecture"] == "llama" and info["file_type"] == "Q4_0" and info["block_count"] == 2
    assert info["tensor_count"] == len(tensors) and info["parameters"] == sum(int(t.n_elements) for t in tensors)
    assert set(info["types"]) == set(by_type) and {"Q4_0", "F32"} <= set(by_type)
    for name, group in by_type.items():
        entry = info["types"][name]
        assert entry["tensors"] == len(group) and entry["bytes"] == sum(int(t.n_bytes) for t in group)
        assert entry["share_tensors_pct"] == pytest.approx(100 * len(group) / len(tensors), abs=0.01)
    assert sum(e["share_bytes_pct"] for e in info["types"].values()) == pytest.approx(100, abs=0.02)
    assert info["types"]["Q4_0"]["bits_per_weight"] == 4.5 and info["types"]["F32"]["bits_per_weight"] == 32
    total_bytes = sum(int(t.n_bytes) for t in tensors)
    assert info["bits_per_weight"] == pytest.approx(8 * total_bytes / info["parameters"], abs=1e-3)
    assert info["tokenizer"]["model"] == "gpt2" and info["tokenizer"]["vocab_size"] == 320
    assert info["quantkit"]["target_format"] == "gguf" and info["quantkit"]["gguf_type"] == "q4_0"
    assert info["size_bytes"] == q4_gguf.stat().st_size


def test_info_table_on_a_quantkit_gguf(q4_gguf):
    res = runner.invoke(app, ["info", str(q4_gguf)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    for needle in ("architecture", "llama", "Q4_0", "tensor types", "gpt2 (", "320 tokens", "bits per weight",
                   "target_format=gguf"):
        assert needle in out, needle
    q4_row = next(ln for ln in out.splitlines() if ln.startswith("│ Q4_0"))
    assert q4_row.split("│")[-2].strip() == "4.50"  # bits/w of the Q4_0 tensors


def test_info_on_a_foreign_gguf_without_tokenizer_or_provenance(tmp_path):
    path = tmp_path / "bare.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    res = runner.invoke(app, ["info", str(path), "--json", "-"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["quantkit"] is None and info["tokenizer"]["vocab_size"] is None and info["tensor_count"] == 1
    assert info["types"] == {"F32": {"tensors": 1, "bytes": 128, "weights": 32, "share_tensors_pct": 100.0,
                                     "share_bytes_pct": 100.0, "bits_per_weight": 32.0}}
    table = runner.invoke(app, ["info", str(path)])
    assert table.exit_code == 0 and "F32" in table.stdout, table.output
