"""llama.cpp (llama-cpp-python) as a client of quantkit's GGUF files, for the tests that compare its logits."""

from __future__ import annotations

import numpy as np


def llama_logits(path, ids) -> np.ndarray:
    """(len(ids), vocab) float32 logits of llama.cpp on token ids `ids` of the GGUF file at `path`."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    out = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out
