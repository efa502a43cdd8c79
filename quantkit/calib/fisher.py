"""The diagonal Fisher information of the float model's hidden states, as calibration statistics.

The KL between the float model's next-token distributions and a quantized model's is, to second order about the
float model, ½ δᵀ F δ with F the Fisher information: E[g gᵀ], g = ∂ log p(ŷ) / ∂h for a hidden state h, ŷ drawn
from the model's own softmax (the true Fisher, which is the KL's Hessian; the empirical one, with the text's
next tokens, is not). Its diagonal says how much an error in each coordinate of h costs at the output.

`fisher_passes` runs the passes (one window a pass, no parameter gradient formed, gradient flags left as found);
the callers gather what they need through tensor hooks:
- `block_output_fisher`: per decoder block, the channel profile of its outputs' Fisher (SignRound's block loss);
- `quantkit.budget.fisher.output_fisher`: per Linear, its outputs' (the bit allocation's sensitivity).

The backward pass needs the whole model at once (not block by block).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from quantkit.calib.hooks import HookSet


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of `model` takes a gradient inside; the flags are restored on the way out."""
    was = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in was:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in was:
            p.requires_grad_(flag)


def sampled_labels(logits: Tensor, gen: torch.Generator) -> Tensor:
    """One next token per position drawn from softmax(logits) (..., V) -> (...,) int64, with `gen` on the CPU."""
    probs = torch.softmax(logits.detach().float(), -1).reshape(-1, logits.shape[-1]).cpu()
    return torch.multinomial(probs, 1, generator=gen).view(logits.shape[:-1]).to(logits.device)


def fisher_passes(model: nn.Module, samples: Tensor, device: torch.device | str = "cpu", seed: int = 0) -> int:
    """One forward and backward pass of `model` per window of `samples` (N, T token ids), the loss the sampled
    labels' negative log-likelihood (generator `seed`); returns the number of tokens. Tensor hooks registered on
    the way (by forward hooks the caller holds) see g = ∂ log p(ŷ) / ∂h, up to sign."""
    gen = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings()
    tokens = 0
    with frozen(model), torch.enable_grad():
        for i in range(samples.shape[0]):
            ids = samples[i:i + 1].to(device)
            x = embed(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits
            labels = sampled_labels(logits, gen)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
            torch.autograd.grad(loss, x)
            tokens += ids.numel()
    return tokens


def block_output_fisher(model: nn.Module, blocks: Sequence[nn.Module], samples: Tensor,
                        device: torch.device | str = "cpu", seed: int = 0) -> list[Tensor]:
    """Per block of `blocks` (modules of `model`), a (hidden,) float32 channel profile u of its outputs' Fisher,
    normalized to mean 1:

        u_c ∝ mean over tokens t of g_tc² · mean_c' y_tc'²,   y the block's output, g = ∂ log p(ŷ) / ∂y.

    Each token's own scale is taken out (the next norm divides y_t by its root mean square, so g_t carries a
    factor 1 / rms(y_t), which the block loss's per-token normalization already applies): what remains is how
    much each residual channel matters downstream, averaged over tokens, so that u_c / mean(y_t²) ≈ E[g_tc²]."""
    acc: dict[int, Tensor] = {}

    def make(i: int):
        def on_forward(_mod: nn.Module, _inp: object, out: Any) -> None:
            y = out[0] if isinstance(out, (tuple, list)) else out
            if not y.requires_grad:
                return
            ms = y.detach().float().pow(2).mean(-1, keepdim=True)

            def on_grad(g: Tensor) -> None:  # returns None: the gradient flows on unchanged
                term = (g.double().pow(2) * ms.double()).reshape(-1, g.shape[-1]).sum(0)
                acc[i] = term if i not in acc else acc[i].add_(term)
            y.register_hook(on_grad)
        return on_forward

    with HookSet() as hooks:
        for i, block in enumerate(blocks):
            hooks.forward(block, make(i))
        fisher_passes(model, samples, device, seed)
    out = []
    for i in range(len(blocks)):
        a = acc.get(i)
        if a is None:
            raise RuntimeError(f"block {i} took no gradient in the Fisher passes")
        out.append((a / a.mean().clamp(min=1e-300)).float().cpu())
    return out
