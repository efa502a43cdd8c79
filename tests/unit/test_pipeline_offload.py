"""`--offload disk`: blocks streamed from sharded safetensors give the same checkpoint as the in-memory path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from quantkit.api import quantize
from quantkit.calib.offload import DiskBlocks, build_skeleton
from quantkit.errors import QuantkitError
from tests.tiny import llama_config, make_model, write_text


def _sharded(folder, config):
    """A tiny model saved in several small shards (so blocks span shard boundaries)."""
    from transformers import AutoModelForCausalLM

    make_model(folder, config)
    model = AutoModelForCausalLM.from_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


def _run(folder, out, text, **opts):
    return quantize(folder, "gptq", out, scheme={"bits": 4, "group_size": 32},
                    calib={"dataset": str(text), "nsamples": 4, "seqlen": 32, "batch_size": 2},
                    options=opts, device="cpu")


def test_skeleton_holds_no_block_weights(tmp_path):
    folder = _sharded(tmp_path / "m", llama_config(layers=3))
    model, spec, index = build_skeleton(folder)
    blocks = model.get_submodule(spec.blocks)
    assert all(p.is_meta for p in blocks.parameters())
    assert not any(p.is_meta for n, p in model.named_parameters() if not n.startswith(spec.blocks))
    source = DiskBlocks(model, spec, index, drop={"model.layers.1.mlp.down_proj"})
    block = source.load(1, torch.device("cpu"))
    assert not any(p.is_meta for p in block.parameters())
    source.release(1, block)
    assert block.mlp.down_proj.weight.is_meta and not block.input_layernorm.weight.is_meta


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_offload_matches_in_memory_byte_for_byte(tmp_path, text, arch):
    if arch == "llama":
        config = llama_config(layers=3)
    else:
        from transformers import Gemma2Config

        config = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                              max_position_embeddings=256, architectures=["Gemma2ForCausalLM"])
    folder = _sharded(tmp_path / "m", config)
    _run(folder, tmp_path / "mem", text)
    _run(folder, tmp_path / "disk", text, offload="disk")
    a = load_file(tmp_path / "mem" / "model.safetensors")
    b = load_file(tmp_path / "disk" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_offload_needs_a_folder(tmp_path):
    from quantkit.methods.base import QuantJob
    from quantkit.methods.gptq.run import GPTQ, GPTQOptions
    from quantkit.models.sources import ModelSource
    from quantkit.scheme import make_scheme

    job = QuantJob(source=ModelSource("gguf", str(tmp_path / "x.gguf"), "x.gguf"), scheme=make_scheme("w4g64"),
                   options=GPTQOptions(offload="disk"))
    with pytest.raises(QuantkitError, match="local model folder"):
        GPTQ().quantize(job)
