"""Generation speed with the KV cache: TTFT, decode tokens/s at batch 1, batched throughput.

Protocol (greedy, no sampling, EOS ignored so every run generates the same count):
- a generation of N = `gen_tokens` new tokens is one prefill over the prompt
  (which yields token 1) followed by N-1 single-token decode steps on the cache;
- TTFT = prefill time for one prompt of `prompt_len` tokens (batch 1);
- TPS = (N-1) / decode time at batch 1;
- throughput = batch x N / (prefill + decode time) for `batch` prompts at once;
- one warm-up run of each shape first, then `repeats` runs; medians are quoted.
Prompts are cut from the test text (quantkit.eval.protocol.prompts), so they are
the same for every model of a run. Timing: see quantkit.eval.hardware.Stopwatch.
"""

from __future__ import annotations

import inspect
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.eval.hardware import Stopwatch


@dataclass(frozen=True)
class SpeedConfig:
    prompt_len: int = 128
    gen_tokens: int = 64
    batch: int = 8
    repeats: int = 3
    warmup: int = 1

    def check(self) -> None:
        for name in ("prompt_len", "gen_tokens", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise QuantkitError(f"--{name.replace('_', '-')} must be at least 1")
        if self.gen_tokens < 2:
            raise QuantkitError("--gen-tokens must be at least 2 (one prefill token and one decode step)")


@dataclass
class SpeedResult:
    ttft_ms: float
    tps: float                 # decode tokens/s at batch 1
    throughput_tps: float      # total generated tokens/s at `batch`
    batch: int
    runs: int


def _cache_arg(model: nn.Module) -> str:
    """The forward's KV-cache argument: `cache` in recent transformers, `past_key_values` before."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _past(out) -> object:
    past = getattr(out, "cache", None)
    return past if past is not None else getattr(out, "past_key_values", None)


@torch.inference_mode()
def _generate(model: nn.Module, prompt: Tensor, new_tokens: int, watch: Stopwatch) -> tuple[float, float]:
    """Greedy generation of `new_tokens` tokens from prompt (B, P); returns (prefill s, decode s)."""
    watch.start()
    out = model(input_ids=prompt, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)        # (B, 1): token 1
    t_prefill = watch.stop()
    past, arg = _past(out), _cache_arg(model)
    watch.start()
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **{arg: past})
        past = _past(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t_decode = watch.stop()
    return t_prefill, t_decode


def measure(model: nn.Module, prompts: Tensor, cfg: SpeedConfig, device: torch.device) -> SpeedResult:
    """Speed of `model` on prompts (>= cfg.batch, >= cfg.prompt_len) int64 ids."""
    cfg.check()
    single = prompts[:1, : cfg.prompt_len].to(device)
    batched = prompts[: cfg.batch, : cfg.prompt_len].to(device)
    watch = Stopwatch(device)
    for _ in range(cfg.warmup):
        _generate(model, single, min(cfg.gen_tokens, 4), watch)
        _generate(model, batched, min(cfg.gen_tokens, 4), watch)
    ttft, tps, thr = [], [], []
    for _ in range(cfg.repeats):
        pre, dec = _generate(model, single, cfg.gen_tokens, watch)
        ttft.append(pre)
        tps.append((cfg.gen_tokens - 1) / max(dec, 1e-9))
        pre_b, dec_b = _generate(model, batched, cfg.gen_tokens, watch)
        thr.append(cfg.batch * cfg.gen_tokens / max(pre_b + dec_b, 1e-9))
    return SpeedResult(ttft_ms=1000.0 * statistics.median(ttft), tps=statistics.median(tps),
                       throughput_tps=statistics.median(thr), batch=cfg.batch, runs=cfg.repeats)
