"""llama.cpp as a peer in benchmarks/kernels.py: the same model exported to GGUF Q4_0 and Q8_0 by
`quantkit convert`, run through llama-cpp-python and timed like the torch variants (same prompt ids,
same decode steps and prefill length, same thread count, round-robin with them).

llama-cpp-python is optional (it compiles llama.cpp from source, about 15 minutes here):
`make llamacpp` installs it into .venv; without it the kernel benchmark leaves these rows out.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("benchmarks.llamacpp")
TYPES = ("q4_0", "q8_0")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """One GGUF file in llama.cpp, with the timing interface of benchmarks/kernels.py's torch models."""

    def __init__(self, path: Path, threads: int, n_ctx: int = 512, logits_all: bool = False):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        """(vocab,) logits of the last evaluated token (llama.cpp keeps only those without logits_all)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))

    def decode_step_time(self, prompt: torch.Tensor, steps: int) -> float:
        """Seconds per generated token at batch 1 (greedy, KV cache), prefill excluded."""
        self.llm.reset()
        self.llm.eval(prompt[0].tolist())
        tok = int(self._last_logits().argmax())
        t0 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([tok])
            tok = int(self._last_logits().argmax())
        return (time.perf_counter() - t0) / steps

    def prefill_time(self, ids: torch.Tensor) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids[0].tolist())
        return time.perf_counter() - t0

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, vocab) float32 logits of every position (needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(self.llm.scores[: ids.shape[1]], dtype=np.float32))


def export(src: str | Path, folder: Path) -> dict[str, Path]:
    """GGUF files of `src` (a plain HF model) in each of TYPES, written by `quantkit convert`."""
    from quantkit.convert import convert

    out = {}
    for t in TYPES:
        path = folder / f"model-{t}.gguf"
        t0 = time.perf_counter()
        convert(src, "gguf", path, gguf_type=t, force=True)
        log.info("exported %s in %.1f s (%.0f MB)", path.name, time.perf_counter() - t0, path.stat().st_size / 1e6)
        out[t] = path
    return out


def variants(src: str | Path, folder: Path, threads: int, ids: torch.Tensor, exact: torch.Tensor
             ) -> tuple[dict[str, LlamaCpp], dict[str, float], dict[str, str]]:
    """llama.cpp Q4_0/Q8_0 models of `src`; their logit error against `exact` (the fp32 torch model's
    (n, vocab) logits on `ids`), which includes each type's own quantization error."""
    models: dict[str, LlamaCpp] = {}
    errs: dict[str, float] = {}
    notes: dict[str, str] = {}
    for t, path in export(src, folder).items():
        name = f"llama.cpp {t.upper()}"
        check = LlamaCpp(path, threads, logits_all=True)
        got = check.logits(ids)
        del check
        errs[name] = float((got - exact).norm() / exact.norm())
        t0 = time.perf_counter()
        models[name] = LlamaCpp(path, threads)
        notes[name] = (f"GGUF {path.stat().st_size / 1e6:.0f} MB from `quantkit convert --to gguf --type {t}`, "
                       f"load {time.perf_counter() - t0:.2f} s; logit err vs fp32 (includes {t}'s rounding)")
    return models, errs, notes
