"""How much each Linear's output error costs at the model's output: the diagonal Fisher of its outputs.

The RTN error the allocator weighs (`sensitivity.weighted_error`) is each Linear's own output error; it counts
an error in layer 0's down_proj the same as one in the last block's v_proj. What the user is judged by is the
KL between the float model's and the quantized model's next-token distributions, whose second-order expansion
about the float model is the Fisher information: KL ≈ ½ δᵀ F δ. Per Linear with outputs y = W x, with the
Kronecker-factored diagonal (K-FAC's independence of inputs and output gradients),

    F[(i, j), (i, j)] ≈ E[g_i²] · E[x_j²],   g = ∂ log p(ŷ) / ∂y,  ŷ drawn from the model's own distribution,

so a weight error δW costs about ½ Σ_ij E[g_i²] E[x_j²] δW_ij². This module measures E[g_i²] for every Linear:
one forward and backward pass of the float model per calibration window, labels sampled from its own
softmax (the true Fisher, which is the KL's Hessian; the empirical one, with the text's next tokens, is not).
No parameter gradient is formed: only the activations' gradients, through hooks removed on the way out.

The backward pass needs the whole model at once (not block by block): for models that do not fit, keep the
default `hessian` sensitivity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantkit.calib.fisher import fisher_passes
from quantkit.calib.hooks import HookSet


def output_fisher(model: nn.Module, linears: dict[str, nn.Linear], samples: Tensor,
                  device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Tensor]:
    """{name: (out,) float64 mean over tokens of (∂ log p(ŷ) / ∂y)²} for each Linear of `linears` (modules of
    `model`), over `samples` (N, T token ids), one window a pass, ŷ drawn from the model (generator `seed`)."""
    acc = {n: torch.zeros(m.out_features, dtype=torch.float64, device=device) for n, m in linears.items()}

    def make(name: str):
        def on_grad(g: Tensor) -> None:  # returns None: the gradient flows on unchanged
            acc[name].add_(g.reshape(-1, g.shape[-1]).double().pow(2).sum(0))

        def on_forward(_mod: nn.Module, _inp: object, out: Tensor) -> None:
            if out.requires_grad:
                out.register_hook(on_grad)
        return on_forward

    with HookSet() as hooks:
        for name, m in linears.items():
            hooks.forward(m, make(name))
        tokens = fisher_passes(model, samples, device, seed)
    return {n: (a / max(tokens, 1)).cpu() for n, a in acc.items()}
