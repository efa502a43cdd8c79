"""quantkit's Q4_K_M and calibrated Q4_0 files run in llama.cpp (llama-cpp-python): its logits agree with
quantkit's dequantized model. Skipped when llama_cpp is not importable (`make llamacpp` installs it)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from quantkit.convert import convert

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (make llamacpp)")
IDS = [5, 17, 42, 99, 130, 7, 64, 250, 33, 12, 180, 201]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from tests.tiny import llama_config, make_model

    return make_model(tmp_path_factory.mktemp("wide") / "llama",
                      llama_config(hidden=256, inter=512, architectures=["LlamaForCausalLM"], head_dim=64))


def llama_logits(path, ids):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float32)


def quantkit_logits(path, ids):
    from quantkit.models.sources import _load_gguf

    model, _ = _load_gguf(path, torch.float32)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


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
    # llama.cpp multiplies with 8-bit quantized activations: close, not identical
    scale = np.abs(mine).max()
    assert np.abs(theirs - mine).max() < 0.05 * scale
    assert (theirs.argmax(-1) == mine.argmax(-1)).mean() >= 0.9
