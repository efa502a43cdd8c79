"""Quality under the fixed protocol: perplexity, and KL / top-1 agreement against a base.

Each window of `windows` (n, T) is scored on its own: T-1 predicted tokens.
ppl = exp(mean NLL over all predicted tokens). KL(P_base || P_model) is averaged
over the same tokens, on the full vocabulary. Base logits are computed window
by window and never all kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Quality:
    ppl: float
    nll: float
    tokens: int
    kl: float | None = None          # mean KL(base || model), nats
    kl_p99: float | None = None
    top1: float | None = None        # % of tokens whose argmax matches the base


@torch.no_grad()
def window_logprobs(model: nn.Module, window: Tensor, device: torch.device | str) -> Tensor:
    """(T, V) float32 log-probs for one window (1-D ids)."""
    logits = model(input_ids=window.unsqueeze(0).to(device), use_cache=False).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


def nll_of(logprobs: Tensor, window: Tensor) -> Tensor:
    """(T-1,) negative log-likelihood of each next token."""
    targets = window[1:].to(logprobs.device)
    return -logprobs[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def evaluate(models: Sequence[nn.Module], windows: Tensor, device: torch.device | str = "cpu",
             base: nn.Module | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> list[Quality]:
    """Score every model on the same windows; with `base`, also KL and top-1 against it."""
    nll_sum = [0.0] * len(models)
    count = 0
    kls: list[list[Tensor]] = [[] for _ in models]
    agree = [0] * len(models)
    for w_i, window in enumerate(windows):
        base_lp = window_logprobs(base, window, device) if base is not None else None
        ref = base_lp[:-1] if base_lp is not None else None
        for m_i, model in enumerate(models):
            lp = base_lp if model is base else window_logprobs(model, window, device)
            nll_sum[m_i] += float(nll_of(lp, window).double().sum())
            if ref is not None:
                lp = lp[:-1]
                kls[m_i].append((ref.exp() * (ref - lp)).sum(-1).cpu())
                agree[m_i] += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        count += window.numel() - 1
        if progress:
            progress("windows", w_i + 1, len(windows))
    out = []
    for m_i in range(len(models)):
        nll = nll_sum[m_i] / count
        q = Quality(ppl=math.exp(nll), nll=nll, tokens=count)
        if base is not None:
            kl = torch.cat(kls[m_i]).clamp(min=0)
            q.kl, q.kl_p99 = float(kl.mean()), float(torch.quantile(kl.double(), 0.99))
            q.top1 = 100.0 * agree[m_i] / count
        out.append(q)
    return out
