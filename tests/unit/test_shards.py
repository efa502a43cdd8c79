"""Sharded streaming save: safetensors-exact files, a correct index, readers (quantkit.load, transformers) agree."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save

import quantkit
from quantkit.api import quantize
from quantkit.errors import QuantkitError
from quantkit.formats.shards import INDEX, Entry, assign_shards, read_header, write_file, write_shards
from quantkit.sizes import parse_size
from tests.tiny import llama_config, make_model, write_text


def _entries(tensors):
    return [Entry(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]


def test_one_file_is_byte_identical_to_safetensors():
    g = torch.Generator().manual_seed(0)
    tensors = {"b.qweight": torch.randint(-2**31, 2**31 - 1, (8, 4), dtype=torch.int32, generator=g),
               "a.scales": torch.randn(2, 4, generator=g).half(), "c.weight": torch.randn(3, 5, generator=g),
               "d.ids": torch.arange(3), "e.bf": torch.randn(4, generator=g).bfloat16(),
               "f.mask": torch.tensor([True, False]), "g.u8": torch.arange(5, dtype=torch.uint8),
               "h.i8": torch.arange(3, dtype=torch.int8), "i.i16": torch.arange(3, dtype=torch.int16),
               "j.f64": torch.randn(2, dtype=torch.float64, generator=g), "k.empty": torch.zeros(0),
               "lé.unicode": torch.ones(1)}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        write_file(path, _entries(tensors), {"format": "pt"})
        assert path.read_bytes() == save(tensors, metadata={"format": "pt"})
        assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == read_header(path)


def test_greedy_assignment_keeps_order_and_isolates_big_tensors():
    sizes = [40, 40, 30, 200, 10, 10]
    entries = [Entry(f"t{i}", torch.uint8, (n,), lambda: None) for i, n in enumerate(sizes)]
    shards = assign_shards(entries, 100)
    assert [[e.name for e in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]


def test_write_shards_index(tmp_path):
    tensors = {f"model.layers.{i}.w": torch.full((64,), float(i)) for i in range(5)}
    files = write_shards(tmp_path, _entries(tensors), max_shard_size=600)
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 4
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
    for name, f in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / f)[name], tensors[name])


def test_sizes():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123 and parse_size("1.5 KiB") == 1536
    for bad in ("two", "5XB", "0", "-3MB"):
        with pytest.raises(QuantkitError):
            parse_size(bad, "--max-shard-size")


def test_transformers_reads_a_sharded_float_export(tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_model(tmp_path / "m", llama_config(layers=2))
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    out = tmp_path / "hf"
    out.mkdir()
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embeddings
    files = write_shards(out, _entries(sd), max_shard_size=40_000)
    assert len(files) > 2
    model.config.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def _sha(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sharded_checkpoint_loads_like_the_single_file(tmp_path, method):
    base = make_model(tmp_path / "m", llama_config(layers=3))
    text = write_text(tmp_path / "calib.txt")
    kw = dict(scheme={"bits": 4, "group_size": 32}, device="cpu",
              calib={"dataset": str(text), "nsamples": 4, "seqlen": 32, "batch_size": 2})
    quantize(base, method, tmp_path / "one", **kw)
    quantize(base, method, tmp_path / "many", max_shard_size="30KB", **kw)
    one, many = _sha(tmp_path / "one"), _sha(tmp_path / "many")
    assert "model.safetensors" in one and INDEX not in one
    shards = [f for f in many if f.startswith("model-")]
    assert len(shards) > 2 and INDEX in many and "model.safetensors" not in many
    index = json.loads((tmp_path / "many" / INDEX).read_text())
    single = load_file(tmp_path / "one" / "model.safetensors")
    assert set(index["weight_map"]) == set(single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    for f in shards:
        part = load_file(tmp_path / "many" / f)
        assert all(index["weight_map"][k] == f and torch.equal(v, single[k]) for k, v in part.items())
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(quantkit.load(tmp_path / "one")(ids).logits, quantkit.load(tmp_path / "many")(ids).logits)
