"""Activation-aware weight quantization (AWQ, Lin et al. 2023): the search as pure functions.

Per decoder block, for every scaling mapping (previous op -> Linears it feeds -> module to inspect):
  x_mean = mean |x| per input channel of the Linears, over every calibration token;
  for alpha = k / n_grid, k = 0..n_grid-1: s = x_mean**alpha, normalised so sqrt(max s * min s) = 1;
  score: quantize W*s on the scheme's grid, divide by s again, run the inspect module on the
  calibration inputs and take the mean squared error against its float output; keep the best s.
A scale is folded exactly: the previous op's output is divided by s (norm weight and bias, or the
previous Linear's output rows) and the Linears' input columns are multiplied by s.

Then clipping, per (output channel, group): max |w| shrunk by (1 - i/n_grid) for i < max_shrink*n_grid,
scored by the Linear's own output error. That error is computed exactly from the per-group Gram
matrices X_g^T X_g of every calibration token: err = d^T H_g d for the weight change d of a group,
so the cost does not grow with the token count. q/k projections are not clipped (as in AutoAWQ:
their own output error is not what the attention logits feel).

Cost control: x_mean and the Gram matrices see all tokens; the alpha grid is scored on a fixed
subsample (`score_tokens` random tokens for token-wise modules, whole sequences for attention),
and screened first: every alpha on a quarter of that subsample, then the best SCREEN_KEEP and
alpha 0 (plain RTN, so the choice is never worse than RTN on the objective) on all of it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from quantkit.grid import fake_quantize, fit_grid

log = logging.getLogger(__name__)

_NO_CLIP = ("q_proj", "k_proj", "qkv_proj", "query", "key", "query_key_value", "Wqkv", "c_attn")
_CHUNK_ELEMENTS = 1 << 24  # floats per batched-candidate tensor (64 MiB): bounds the grid's memory


@dataclass(frozen=True)
class AWQConfig:
    """The integer grid and the search's knobs."""

    bits: int
    group_size: int          # -1: one group per output channel
    sym: bool
    n_grid: int = 20
    max_shrink: float = 0.5
    score_tokens: int = 2048  # tokens scoring each alpha, at most 1/4 of the data (attention: whole sequences)
    seed: int = 0
    # "float": the next block is calibrated on this block's float outputs (AutoAWQ, llm-compressor; one
    # pass per block); "quantized": on its quantized outputs (one more pass per block)
    propagate: str = "float"
    screen: bool = True      # screen the alpha grid on a quarter of the scoring sample first

    def meta(self) -> dict[str, str]:
        """Recorded beside a dumped search, checked when it is loaded again."""
        return {k: str(getattr(self, k)) for k in ("bits", "group_size", "sym", "n_grid", "max_shrink",
                                                    "score_tokens", "seed", "propagate", "screen")}


# ---------------------------------------------------------------- grid maths


def group_view(w: Tensor, group_size: int) -> Tensor:
    """(..., out, in) -> (..., out, n_groups, gs)."""
    in_f = w.shape[-1]
    gs = in_f if group_size == -1 else group_size
    return w.reshape(*w.shape[:-1], in_f // gs, gs)


def fake_quant(w: Tensor, cfg: AWQConfig) -> Tensor:
    """Quantize-dequantize (..., out, in) per group on the scheme's min/max grid."""
    g = group_view(w, cfg.group_size)
    scale, zero = fit_grid(g, cfg.bits, cfg.sym)
    return fake_quantize(g, scale, zero, cfg.bits).reshape(w.shape)


def candidate_scales(x_mean: Tensor, n_grid: int) -> Tensor:
    """(C,) mean |x| -> (n_grid, C): s = x_mean**alpha for alpha = k/n_grid, normalised per row."""
    alphas = torch.arange(n_grid, dtype=torch.float32, device=x_mean.device) / n_grid
    s = x_mean.float()[None, :].pow(alphas[:, None]).clamp(min=1e-4)
    return s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()


def scaled_fake_quant(w: Tensor, s: Tensor, cfg: AWQConfig) -> Tensor:
    """w (out, in), s (k, in) -> (k, out, in): Q(w * s) / s, the weight each candidate would act as."""
    return fake_quant(w[None] * s[:, None, :], cfg) / s[:, None, :]


@torch.no_grad()
def search_clip(w: Tensor, gram: Tensor, cfg: AWQConfig) -> Tensor:
    """Best max |w| per (output, group): w (out, in), gram (G, gs, gs) of the Linear's input -> (out, G)."""
    wg = group_view(w.float(), cfg.group_size)                # (out, G, gs)
    org = wg.abs().amax(-1)                                  # (out, G)
    best, best_err = org.clone(), torch.full_like(org, math.inf)
    for i in range(int(cfg.max_shrink * cfg.n_grid)):
        mx = (org * (1 - i / cfg.n_grid))[..., None]
        q = fake_quant(torch.maximum(torch.minimum(wg, mx), -mx).reshape(w.shape), cfg)
        d = (group_view(q, cfg.group_size) - wg).transpose(0, 1)  # (G, out, gs)
        err = ((d @ gram) * d).sum(-1).t()                    # (out, G): d^T H_g d
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, mx[..., 0], best)
    return best


def clip_weight(w: Tensor, max_abs: Tensor, group_size: int) -> Tensor:
    """Clamp each (output, group) of w (out, in) to [-max_abs, max_abs] (max_abs (out, G))."""
    g = group_view(w, group_size)
    m = max_abs.to(w.dtype)[..., None]
    return torch.maximum(torch.minimum(g, m), -m).reshape(w.shape)


SCREEN_KEEP = 3  # candidates re-scored on the whole scoring sample after screening (alpha 0 always is too)


class Evaluator(Protocol):
    """Scores a batch of candidates: one (k, out, in) fake-quantized weight per Linear -> (k,) losses.
    With `screen`, on a quarter of the scoring sample (`screens` says whether that is smaller)."""

    screens: bool

    def __call__(self, w_hats: list[Tensor], screen: bool = False) -> Tensor: ...


@dataclass(frozen=True)
class ScaleChoice:
    scale: Tensor                # (C,) the chosen s
    index: int                   # its alpha is index / n_grid
    losses: dict[int, float]     # alpha index -> loss on the whole scoring sample, for the re-scored ones


@torch.no_grad()
def best_scale(x_mean: Tensor, weights: list[Tensor], evaluate: Evaluator, cfg: AWQConfig) -> ScaleChoice:
    """Grid search over alpha. With `cfg.screen`, every alpha is first scored on a quarter of the
    sample, then the best SCREEN_KEEP and alpha 0 (plain RTN) are scored on all of it; the best wins."""
    cands = candidate_scales(x_mean, cfg.n_grid)
    chunk = max(1, _CHUNK_ELEMENTS // sum(w.numel() for w in weights))

    def score(idx: list[int], screen: bool) -> Tensor:
        sel = cands[idx]
        return torch.cat([evaluate([scaled_fake_quant(w, c, cfg) for w in weights], screen)
                          for c in sel.split(chunk)])

    keep = list(range(cfg.n_grid))
    if cfg.screen and evaluate.screens and cfg.n_grid > SCREEN_KEEP + 1:
        order = torch.argsort(score(keep, True), stable=True)
        keep = sorted({0, *order[:SCREEN_KEEP].tolist()})
    final = score(keep, False)
    best = keep[int(torch.argmin(final))]
    return ScaleChoice(cands[best], best, dict(zip(keep, final.tolist())))


def mixes_tokens(name: str, module: nn.Module) -> bool:
    """Attention modules mix positions: they are scored on whole sequences, not on token subsamples."""
    leaf = name.rsplit(".", 1)[-1].lower()
    return not isinstance(module, nn.Linear) and ("attn" in leaf or "attention" in leaf)


def clip_eligible(name: str) -> bool:
    return name.rsplit(".", 1)[-1] not in _NO_CLIP
