"""The norms the end-to-end stage tunes, and their relative parametrization (`E2EParams.norms="relative"`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def norm_params(model: nn.Module) -> dict[str, nn.Parameter]:
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return {n: p for n, p in model.named_parameters()
            if p.ndim == 1 and id(p) not in linear and "norm" in n and n.endswith("weight")}


class RelativeNorms:
    """The norms' gains tuned in relative terms: gain = g0 * exp(t), t starting at 0. A norm's gain is affine in its
    weight with slope 1 (x * w, or Gemma's x * (1 + w)), so w = w0 + g0 * (exp(t) - 1), with g0 read off the
    module itself (the gain of an all-ones input). An additive step of Adam's size would move the tiny weights that
    hold down a model's outlier channels (SmolLM2: |w| down to 1e-5) by many times their own size."""

    def __init__(self, model: nn.Module, norms: dict[str, nn.Parameter]):
        self.norms = norms
        self.prefix = f"{model.base_model_prefix}."
        self.w0, self.g0 = {}, {}
        with torch.no_grad():
            for n, w in norms.items():
                module = model.get_submodule(n.rsplit(".", 1)[0])
                ones = torch.ones(1, w.shape[0], dtype=w.dtype, device=w.device)
                self.w0[n], self.g0[n] = w.detach().clone(), module(ones).reshape(-1).detach().to(w.dtype)
        self.logs = {n: torch.zeros_like(w, requires_grad=True) for n, w in norms.items()}

    def _value(self, n: str) -> Tensor:
        return self.w0[n] + self.g0[n] * torch.expm1(self.logs[n])

    def weights(self) -> dict[str, Tensor]:
        return {n.removeprefix(self.prefix): self._value(n) for n in self.norms}

    def store(self) -> None:
        with torch.no_grad():
            for n, w in self.norms.items():
                w.copy_(self._value(n))
