"""A quantized token embedding in compressed-tensors (0.19.0): what `quantize --embedding` writes, compressed-tensors
decompresses to exactly the weights quantkit.load computes with (the lookup and the tied lm_head's logits); and what
compressed-tensors itself writes for an `Embedding` config group (llm-compressor's way), quantkit.load reads.

Runs in the interop environment (scripts/setup-interop.sh):
    .venv-interop/bin/python -m pytest tests/interop/test_ct_embedding_interop.py
and skips cleanly anywhere compressed-tensors cannot be imported.

transformers 5.24 itself does not load such checkpoints yet, ours or compressed-tensors' own: after the Embedding
module is compressed it has no `weight`, and transformers' weight initialisation fails on it. So the float model here
is built the way transformers would after decompression: compressed-tensors matches each module to its config group
(its own `is_match`, `ignore` honoured) and its compressor decompresses the module's tensors.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.needs import require  # noqa: E402
require("compressed_tensors")

import quantkit
from quantkit.api import quantize
from quantkit.formats.stats import checkpoint_stats
from tests.tiny import llama_config, make_model

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def ct_model(out, scale_dtype: torch.dtype = torch.float32):
    """The float model compressed-tensors decompresses `out` to; scales cast to `scale_dtype` first (its
    decompression computes s * q in the scales' dtype), and a tied lm_head re-tied to the decompressed table."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_file(str(out / "model.safetensors"))
    state = {k: v for k, v in tensors.items() if not k.rsplit(".", 1)[1].startswith("weight_")}
    matched = {}
    for name, module in model.named_modules():
        groups = [g for g in qc.config_groups.values() if any(is_match(name, module, t, qc.ignore) for t in g.targets)]
        if not groups or f"{name}.weight_packed" not in tensors:
            continue
        local = {k.removeprefix(name + "."): t for k, t in tensors.items() if k.rsplit(".", 1)[0] == name}
        local["weight_scale"] = local["weight_scale"].to(scale_dtype)
        scheme = groups[0]
        weight = BaseCompressor.get_value_from_registry(scheme.format or qc.format).decompress(local, scheme)["weight"]
        state[f"{name}.weight"] = weight
        for k in local:
            state.pop(f"{name}.{k}", None)
        matched[name] = (type(module).__name__, weight)
    if config.tie_word_embeddings:  # compressed-tensors also saves the float copy of a tied head: the tie wins
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model, matched


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ct-emb") / "llama",
                      llama_config(hidden=128, inter=256, architectures=["LlamaForCausalLM"]))


@pytest.mark.parametrize("embedding", ["int8", "int4"])
def test_compressed_tensors_decompresses_quantkit_embedding(base, tmp_path, embedding):
    out = tmp_path / embedding
    quantize(base, "rtn", out, scheme={"bits": 4, "group_size": 32, "sym": True, "embedding": embedding},
             device="cpu", fmt="compressed-tensors")
    ours = quantkit.load(out).eval()
    theirs, matched = ct_model(out)
    assert matched["model.embed_tokens"][0] == "Embedding" and len(matched) == 15  # 14 Linears + the embedding
    assert "lm_head" not in matched
    emb = ours.model.embed_tokens.weight
    assert torch.equal(theirs.model.embed_tokens.weight, emb)  # s * q in float32: exact on both sides
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    half, _ = ct_model(out, torch.float16)  # their fp16 decompression: the same table, rounded once
    assert torch.equal(half.model.embed_tokens.weight, emb.half().float())
    with torch.no_grad():
        a, b = theirs(IDS).logits, ours(IDS).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())


def write_with_compressed_tensors(src, out, tied: bool) -> None:
    """An `Embedding` config group (int8, per row) beside W4A16 Linears (group 128), quantized and compressed by
    compressed-tensors itself (min/max scales per group from its calculate_qparams), saved as llm-compressor saves
    a model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    int8_rows = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W4A16", ["Linear"]),
                                               "group_1": QuantizationScheme(targets=["Embedding"], weights=int8_rows)},
                                ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config)
    for mod in model.modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is not None:
            w = mod.weight.data
            w = w.reshape(w.shape[0], -1, scheme.weights.group_size or w.shape[1])  # (rows, groups, group size)
            scale, _ = calculate_qparams(w.amin(dim=-1), w.amax(dim=-1), scheme.weights)
            mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)


@pytest.mark.parametrize("tied", [False, True])
def test_quantkit_reads_compressed_tensors_embedding(base, tmp_path, tied):
    out = tmp_path / f"ct-{tied}"
    try:
        write_with_compressed_tensors(base, out, tied)
    except Exception as e:  # compressed-tensors' own writer, not quantkit's reader, is what failed
        pytest.skip(f"compressed-tensors 0.19 cannot write this case ({type(e).__name__}: {str(e)[:80]})")
    ours = quantkit.load(out).eval()
    theirs, matched = ct_model(out)
    assert matched["model.embed_tokens"][0] == "Embedding"
    assert torch.equal(ours.model.embed_tokens.weight, theirs.model.embed_tokens.weight)
    assert (ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        a, b = theirs(IDS).logits, ours(IDS).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())
    stats = checkpoint_stats(out)
    assert 8 < stats["embedding_bits_per_weight"] < 8.5 and 4 < stats["bits_per_weight"] < 4.5
