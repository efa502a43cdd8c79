"""quantkit's Q4_K_M and calibrated Q4_0 files run in llama.cpp (llama-cpp-python): its logits agree with
quantkit's dequantized model. Skipped when llama_cpp is not importable (`make llamacpp` installs it).

llama.cpp multiplies quantized weights with 8-bit quantized activations, so its logits are close to the
dequantized model's, not equal. Measured with llama-cpp-python 0.3.36 (x86-64-v3 build, 2 threads), as a share of
max |logit| of the dequantized model:
- tiny Llama (hidden 256): llama.cpp vs dequantized max 0.85% (q4_k_m), 0.67% (calibrated q4_0); the
  dequantized model vs the float one (the quantization itself) 8.05% and 8.07%; top-1 agreement 100%.
- SmolLM2-135M q4_k_m, 46 tokens: llama.cpp vs dequantized rms 1.22%, top-1 91.3%; dequantized vs float rms
  2.69%. llama.cpp's q8_0 file vs the float model: rms 0.97% (activation rounding alone is about that much),
  its f32 file vs the float model: max 0.07%.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit.convert import convert
from tests.llamacpp_client import llama_logits

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (make llamacpp)")
IDS = [5, 17, 42, 99, 130, 7, 64, 250, 33, 12, 180, 201]
SMOLLM2 = Path.home() / ".cache/quantkit/models/smollm2-135m"
TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. It is 330 metres tall, and for 41 years it "
        "was the tallest man-made structure in the world.")


def quantkit_logits(path, ids):
    from quantkit.models.sources import _load_gguf

    model, _ = _load_gguf(path, torch.float32)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def float_logits(src, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("gguf_type,calibrate", [("q4_k_m", False), ("q4_0", True)])
def test_llama_cpp_logits_match_the_dequantized_model(wide, tmp_path, gguf_type, calibrate):
    path = tmp_path / f"{gguf_type}.gguf"
    if calibrate:
        from quantkit.convert.imatrix import write_imatrix
        from tests.tiny import write_text

        imat = tmp_path / "m.imatrix.gguf"
        write_imatrix(wide, imat, dataset=str(write_text(tmp_path / "calib.txt")), nsamples=4, seqlen=64)
        convert(wide, "gguf", path, gguf_type=gguf_type, use_imatrix=imat)
    else:
        convert(wide, "gguf", path, gguf_type=gguf_type)
    theirs = llama_logits(path, IDS)
    mine = quantkit_logits(path, IDS)
    exact = float_logits(wide, IDS)
    scale = np.abs(mine).max()
    gap = np.abs(theirs - mine).max()
    # measured 0.85% / 0.67% of max |logit|: 2% leaves room for thread counts and CPUs, and stays far below
    # the quantization error itself (8%), so llama.cpp must be running the very weights quantkit wrote
    assert gap < 0.02 * scale
    assert gap < 0.25 * np.abs(mine - exact).max()
    assert (theirs.argmax(-1) == mine.argmax(-1)).mean() >= 0.9


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(), reason="smollm2-135m is not cached")
def test_smollm2_q4_k_m_runs_in_llama_cpp(tmp_path):
    """A real model: the 576-wide Q4_K_M mix (Q5_0/Q4_K/Q6_K/Q8_0), its tokenizer metadata, llama.cpp's logits."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    path = tmp_path / "smollm2.q4_k_m.gguf"
    convert(SMOLLM2, "gguf", path, gguf_type="q4_k_m")
    ids = AutoTokenizer.from_pretrained(SMOLLM2)(TEXT, add_special_tokens=False)["input_ids"]
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert vocab.tokenize(TEXT.encode(), add_bos=False) == ids
    vocab.close()
    theirs = llama_logits(path, ids)
    mine = quantkit_logits(path, ids)
    scale = np.abs(mine).max()
    # measured: rms 1.22% of max |logit| and top-1 91.3% over these 46 tokens (8-bit activations on a real model)
    assert np.sqrt(((theirs - mine) ** 2).mean()) < 0.02 * scale
    assert (theirs.argmax(-1) == mine.argmax(-1)).mean() >= 0.85
