"""quantkit's Gemma 3 GGUF files run in llama.cpp (llama-cpp-python) as transformers runs the model.
Skipped when llama_cpp is not importable (`make llamacpp` installs it).

The tiny Gemma 3 (tests/tiny.py) turns on what llama.cpp must read from the file to agree: 1 + w norms
(random, not zeros), q/k norms, pre/post norms, a sliding window of 8 over 24 tokens on layers 0 and 2
with layer 1 global (a per-layer pattern, not llama.cpp's period-6 default), rope bases 1e6 / 1e4, GQA,
tied embeddings, the SPM-style BPE vocabulary with byte fallback. A wrong key shows in the f32 logits.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from quantkit.convert import convert
from tests.llamacpp_client import llama_logits

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (make llamacpp)")
TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. Water boils"
ODD = "Caf\u00e9 \U0001f680 na\u00efve \u2014 x"  # characters the tiny vocabulary lacks: byte fallback


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from tests.tiny import make_gemma3

    return make_gemma3(tmp_path_factory.mktemp("gemma3cpp") / "g3")


def dequantized_model(src, path):
    """The HF model of `src` with every weight replaced by the GGUF file's, dequantized (norms shifted back by 1)."""
    from gguf import MODEL_ARCH, GGUFReader, TensorNameMap
    from gguf import quants as gq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tmap = TensorNameMap(MODEL_ARCH.GEMMA3, model.config.num_hidden_layers)
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = tensors[tmap.get_name(name, try_suffixes=(".weight",))]
            w = torch.from_numpy(gq.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(p.shape).copy())
            p.copy_(w - 1 if name.endswith("norm.weight") else w)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_tokenizer_matches_transformers(gemma, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    path = tmp_path / "g.gguf"
    convert(gemma, "gguf", path, gguf_type="f32")
    hf = AutoTokenizer.from_pretrained(gemma)
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in (TEXT, ODD, "two  spaces and\n\nnewlines\n"):
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert vocab.tokenize(text.encode(), add_bos=False) == ids
        assert vocab.detokenize(ids).decode() == text  # byte tokens typed BYTE come back as bytes
    assert vocab.tokenize(TEXT.encode())[:1] == [2]  # add_bos: <bos> first, as transformers' post-processor
    vocab.close()


def test_f32_logits_match_transformers(gemma, tmp_path):
    """The sliding window, both rope bases, the norms and the attention scale as llama.cpp reads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "g.gguf"
    convert(gemma, "gguf", path, gguf_type="f32")
    ids = [2] + AutoTokenizer.from_pretrained(gemma)(TEXT * 3, add_special_tokens=False)["input_ids"][:23]
    assert len(ids) == 24  # three times the window of 8
    theirs = llama_logits(path, ids)
    mine = hf_logits(AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval(), ids)
    # measured max |diff| 6.9e-4 of max |logit| (llama.cpp's KV cache is F16); files with one key wrong gave
    # 0.54 (no per-layer pattern: llama.cpp's default makes every layer slide), 0.92 (no sliding window),
    # 0.44 (the two rope bases swapped), 1.0 (norms stored as w, not 1 + w)
    assert np.abs(theirs - mine).max() < 5e-3 * np.abs(mine).max()


def test_linear_rope_scaling_and_logit_softcap_match_transformers(tmp_path):
    """Gemma 3 4B+ scale the global layers' rope linearly (llama.cpp: rope.scaling.*, sliding layers unscaled);
    a final logit soft-cap is written when the config has one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import gemma3_config, make_gemma3

    cfg = gemma3_config(final_logit_softcapping=2.0, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    src = make_gemma3(tmp_path / "g3", cfg, seed=1)
    path = tmp_path / "g.gguf"
    convert(src, "gguf", path, gguf_type="f32")
    ids = [2] + AutoTokenizer.from_pretrained(src)(TEXT * 3, add_special_tokens=False)["input_ids"][:23]
    theirs = llama_logits(path, ids)
    mine = hf_logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), ids)
    assert np.abs(mine).max() < 2.0  # the cap is active
    assert np.abs(theirs - mine).max() < 5e-3 * np.abs(mine).max()


def rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean()))


# Measured (this tiny model, llama-cpp-python 0.3.36, 2 threads), as shares of max |logit|: llama.cpp vs the
# dequantized model rms 0.48% (q8_0), 0.68% (q4_k_m); the quantization itself (dequantized vs float) rms 0.48%
# (q8_0: the 8-bit activations llama.cpp multiplies with cost as much as the 8-bit weights) and 5.5% (q4_k_m).
@pytest.mark.parametrize("gguf_type,vs_quant_error", [("q4_k_m", 0.25), ("q8_0", None)])
def test_quantized_logits_match_the_dequantized_model(gemma, tmp_path, gguf_type, vs_quant_error):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"{gguf_type}.gguf"
    convert(gemma, "gguf", path, gguf_type=gguf_type)
    ids = [2, 5, 17, 42, 99, 130, 7, 64, 250, 33, 12, 180, 201, 300, 410, 77, 260, 11, 300, 150, 90, 8, 401, 270]
    theirs = llama_logits(path, ids)
    mine = hf_logits(dequantized_model(gemma, path), ids)
    scale = np.abs(mine).max()
    assert rms(theirs, mine) < 0.02 * scale
    if vs_quant_error is not None:  # llama.cpp runs the very weights quantkit wrote, not other rounding of them
        exact = hf_logits(AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval(), ids)
        assert rms(theirs, mine) < vs_quant_error * rms(mine, exact)
    assert (theirs.argmax(-1) == mine.argmax(-1)).mean() >= 0.9

