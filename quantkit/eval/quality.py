"""Quality under the fixed protocol: perplexity, and KL / top-1 agreement against a base.

Scoring convention (the Hugging Face sliding-window convention):
- window 0 scores every token it can predict: targets at positions 1..T-1;
- a later window starting `stride` tokens after the previous one scores only the
  tokens the previous window did not: the last min(stride, T-1) positions. With
  stride = T (non-overlapping windows, the GPTQ/AWQ convention) every window
  scores positions 1..T-1.
`first_target` is the first scored position of a window; the logits used are those
of positions first_target-1 .. T-2.

ppl = exp(mean NLL over all scored tokens). KL(P_base || P_model) over the full
vocabulary and top-1 agreement use the same tokens.

The model side never materialises log_softmax: NLL = lse - z[target] and
KL = sum_v p_b (lp_b - z + lse), with z the model's logits and lse their
logsumexp, so a window costs the forward plus a few passes over its (S, V) logits
(in reused buffers: `KLWork`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Quality:
    ppl: float
    nll: float
    tokens: int
    kl: float | None = None          # mean KL(base || model), nats
    kl_p99: float | None = None
    top1: float | None = None        # % of tokens whose argmax matches the base


def first_targets(n_windows: int, seqlen: int, stride: int | None = None) -> list[int]:
    """First scored position of each window: 1 for window 0, T - min(stride, T-1) after."""
    stride = stride or seqlen
    later = seqlen - min(stride, seqlen - 1)
    return [1] + [later] * (n_windows - 1) if n_windows else []


def accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def scored_logits(model: nn.Module, window: Tensor, first: int, device: torch.device | str) -> Tensor:
    """(S, V) float32 logits predicting window[first:], S = T - first.

    Only the last S+1 positions go through the LM head when the model supports
    `logits_to_keep` (a sliding window with a small stride skips most of it).
    """
    keep = window.numel() - first + 1
    kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=window.unsqueeze(0).to(device), use_cache=False, **kwargs).logits[0]
    return logits[-keep:-1].float()


def token_nll(logits: Tensor, targets: Tensor, work: "KLWork | None" = None) -> tuple[Tensor, Tensor]:
    """(nll (S,), lse (S,)) from logits (S, V) and targets (S,).

    With `work`, lse = max + log Σ exp(z - max) goes through one of its reused buffers (the same formula
    as torch.logsumexp, 2.5x faster at 511 x 49,152 for not page-faulting a fresh (S, V) temporary).
    """
    lse = None
    if work is not None:
        m = logits.amax(-1, keepdim=True)                      # (S, 1)
        if bool(torch.isfinite(m).all()):                       # a fully masked row: torch.logsumexp's handling
            _, buf = work.buffers(logits.shape, logits.device)
            lse = torch.sub(logits, m, out=buf).exp_().sum(-1).log_().add_(m.squeeze(-1))
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)
    return lse - picked, lse


def base_logprobs(logits: Tensor) -> Tensor:
    """(S, V) float32 log-probs of the base (what the spill stores)."""
    return torch.log_softmax(logits, dim=-1)


class KLWork:
    """Two float32 scratch buffers of one window's (S, V), reused window after window.

    A fresh (S, V) tensor per step costs more in page faults than the arithmetic on it:
    measured 330 -> 90 ms per 511 x 49,152 window for the whole KL (2 threads, this CPU).
    """

    def __init__(self) -> None:
        self._flat: tuple[Tensor, Tensor] | None = None

    def buffers(self, shape: torch.Size, device: torch.device) -> tuple[Tensor, Tensor]:
        n = shape[0] * shape[1]
        if self._flat is None or self._flat[0].numel() < n or self._flat[0].device != device:
            self._flat = (torch.empty(n, device=device), torch.empty(n, device=device))
        return self._flat[0][:n].view(shape), self._flat[1][:n].view(shape)


def kl_rows(base_lp: Tensor, logits: Tensor, lse: Tensor, work: KLWork | None = None) -> Tensor:
    """(S,) KL(P_base || P_model) per token from base log-probs (S, V) of any float dtype, model logits, lse.

    The base is renormalised on the fly: the float16 spill's rounding leaves Σ exp(lp_b) = Z ≠ 1, and KL
    is taken against the rounded distribution itself, exp(lp_b) / Z, so KL(P~ || P~) = 0 and agreeing
    models stay exact to second order. With e = exp(lp_b) and lp_m = z - lse:

        KL = Σ_v (e / Z) · (lp_b - log Z - z + lse)

    The difference is formed first so its terms are small when the models agree (accurate in float32).
    Not clamped: rounding noise of either sign averages out in the mean. `base_lp` is not modified.
    """
    x, e = work.buffers(logits.shape, logits.device) if work is not None else (
        torch.empty_like(logits), torch.empty_like(logits))
    x.copy_(base_lp)                                                     # float16 spill -> float32
    torch.exp(x, out=e)
    z_sum = e.sum(-1)                                                    # (S,) Z
    x.sub_(logits).add_((lse - z_sum.log()).unsqueeze(-1))               # lp_b - log Z - lp_m
    return torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(-1) / z_sum


@dataclass
class Accumulator:
    """Running totals for one model over the windows."""

    with_base: bool
    nll_sum: float = 0.0
    count: int = 0
    agree: int = 0
    kls: list[Tensor] = field(default_factory=list)

    def add(self, nll: Tensor, kl: Tensor | None = None, agree: int = 0) -> None:
        self.nll_sum += float(nll.double().sum())
        self.count += int(nll.numel())
        self.agree += agree
        if kl is not None:
            self.kls.append(kl.detach().float().cpu())

    def result(self) -> Quality:
        nll = self.nll_sum / max(self.count, 1)
        q = Quality(ppl=math.exp(nll), nll=nll, tokens=self.count)
        if self.with_base:
            kl = torch.cat(self.kls).double() if self.kls else torch.zeros(1, dtype=torch.float64)
            q.kl = max(float(kl.mean()), 0.0)
            q.kl_p99 = max(float(torch.quantile(kl, 0.99)), 0.0)
            q.top1 = 100.0 * self.agree / max(self.count, 1)
        return q


def score_window(model: nn.Module, window: Tensor, first: int, device: torch.device | str, acc: Accumulator,
                 base_lp: Tensor | None = None, base_top: Tensor | None = None, work: KLWork | None = None) -> Tensor:
    """Score one window into `acc`; returns the model's (S, V) logits.

    `base_lp`: the base's (S, V) log-probs (float16 from the spill, or float32); `work`: scratch buffers
    kept by the caller across windows.
    """
    logits = scored_logits(model, window, first, device)
    nll, lse = token_nll(logits, window[first:], work)
    kl, agree = None, 0
    if base_lp is not None:
        top = base_top.to(logits.device) if base_top is not None else base_lp.argmax(-1).to(logits.device)
        agree = int((logits.argmax(-1) == top).sum())
        kl = kl_rows(base_lp, logits, lse, work)
    acc.add(nll, kl, agree)
    return logits


@torch.inference_mode()
def evaluate(models: Sequence[nn.Module], windows: Tensor, device: torch.device | str = "cpu",
             base: nn.Module | None = None,
             progress: Callable[[str, int, int], None] | None = None,
             stride: int | None = None) -> list[Quality]:
    """Score every (already loaded) model on the same windows; with `base`, also KL and top-1 against it.

    The in-memory variant (all models resident): the runner evaluates one model at
    a time instead (see quantkit.eval.runner). Kept for scripts and tests.
    """
    firsts = first_targets(int(windows.shape[0]), int(windows.shape[1]), stride)
    accs = [Accumulator(with_base=base is not None) for _ in models]
    for w_i, (window, first) in enumerate(zip(windows, firsts)):
        base_lp = base_top = None
        if base is not None:
            base_logits = scored_logits(base, window, first, device)
            base_lp = base_logprobs(base_logits)
            base_top = base_logits.argmax(-1)
        for model, acc in zip(models, accs):
            if model is base:
                nll, _ = token_nll(base_logits, window[first:])
                acc.add(nll, torch.zeros_like(nll), int(nll.numel()))
            else:
                score_window(model, window, first, device, acc, base_lp, base_top)
        if progress:
            progress("windows", w_i + 1, len(windows))
    return [a.result() for a in accs]
