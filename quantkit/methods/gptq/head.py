"""GPTQ error feedback on the output head, when the caller's block format has a grid for it (GGUF).

The head reads the final norm's output, so after the last decoder block the pipeline's hidden states
(the quantized model's, as every block was calibrated) give its Hessian: H = 2 XᵀX / n with X the final
norm of each calibration token (hidden x hidden, a few MB). The head is then rounded onto its block grid by
`grid.gptq_on_grid`, exactly as the decoder Linears are.

A tied embedding (SmolLM2, Gemma 3: one GGUF tensor token_embd for both the input lookup and the head)
serves the lookup with the same codes. The lookup's error is each row's own error, unweighted; so the
Hessian is blended with the identity: H + `embed_weight` * mean(diag H) * I. embed_weight 0 rounds for
the head alone; a large embed_weight tends to plain rounding (no error feedback).

llama.cpp's CPU matmul multiplies a Q8_0/Q4_0/Q5_0/IQ4_NL weight by its activations quantized to Q8_0 (blocks
of 32, scale amax/127 stored in f16). With `act_q8=True` the head is rounded for those activations: with X_q the
Q8_0 activations, the target is the least-squares head for them, W* = W C H_q⁻¹ (C = XᵀX_q, H_q = X_qᵀX_q, both
blended with the identity as above), and GPTQ rounds W* with the Hessian of X_q. Then ‖XWᵀ - X_qW_qᵀ‖², the
error the file shows in llama.cpp, is what the rounding minimizes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from quantkit.methods.gptq.activations import Q8_0_WEIGHTS, least_squares_target, q8_0_activations
from quantkit.methods.gptq.algorithm import GPTQParams, HessianAccumulator, group_aware_order, inverse_cholesky
from quantkit.methods.gptq.grid import gptq_on_grid
from quantkit.models.arch import ArchSpec

log = logging.getLogger(__name__)


@dataclass
class HeadTarget:
    name: str          # the module whose `.weight` the format stores (e.g. "lm_head" or "model.embed_tokens")
    weight: Tensor     # (vocab, hidden): the head's weight
    codec: Any         # its block codec
    norm: nn.Module    # the final norm, whose output the head reads
    tied: bool         # the stored tensor is also the input embedding


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def head_target(model: nn.Module, spec: ArchSpec, codecs: dict[str, Any]) -> HeadTarget | None:
    """The head to round, or None (with the reason logged) when the format has no grid for it or the
    architecture does not say where its final norm is."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or spec.residual is None:
        log.info("GPTQ head: %s has no output head or no known final norm; the head stays plain",
                 type(model).__name__)
        return None
    tied = embed is not None and head.weight is embed.weight
    name = _module_name(model, embed if tied else head)
    if name not in codecs:
        log.info("GPTQ head: %s has no block grid in this format; it stays plain", name)
        return None
    return HeadTarget(name, head.weight, codecs[name], model.get_submodule(spec.residual.final_norm), tied)




@dataclass
class HeadStats:
    h: Tensor                 # 2 XᵀX / n of the activations the head multiplies (X_q with act_q8)
    cross: Tensor | None      # 2 XᵀX_q / n (float activations against quantized ones), with act_q8


@torch.no_grad()
def head_hessian(target: HeadTarget, hidden: list[Tensor], device: torch.device, act_q8: bool = False) -> HeadStats:
    """The final norm's outputs over every calibration token: their Hessian (float32, hidden x hidden), or with
    `act_q8` that of their Q8_0 quantization and the cross term."""
    n_in = target.weight.shape[1]
    acc = HessianAccumulator(n_in, device)
    cross = torch.zeros(n_in, n_in, dtype=torch.float32, device=device) if act_q8 else None
    dtype = next(target.norm.parameters(), target.weight).dtype
    for h in hidden:
        x = target.norm(h.to(device, dtype)).float().reshape(-1, n_in)
        if cross is None:
            acc.add(x)
        else:
            xq = q8_0_activations(x)
            acc.add(xq)
            cross.addmm_(x.t(), xq)
    return HeadStats(acc.hessian(), None if cross is None else cross.mul_(2.0 / acc.tokens))


def round_head(target: HeadTarget, stats: HeadStats, params: GPTQParams,
               embed_weight: float) -> dict[str, np.ndarray]:
    """{target.name: the head's bytes on its grid}, GPTQ with `stats` (blended with the identity for a tied
    embedding; towards the least-squares head for Q8_0 activations when `stats.cross` is given: see the
    module docstring)."""
    h = stats.h.to(torch.float32).clone()
    dead = h.diagonal() == 0
    importance = (h.diagonal() / 2).cpu().numpy().astype(np.float32)
    if bool(dead.any()):
        h[dead, dead] = 1.0
    blend = embed_weight * float(h.diagonal().mean()) if target.tied else 0.0
    h.diagonal().add_(blend)
    w = target.weight.detach().to(torch.float32).clone()
    w[:, dead] = 0.0
    if stats.cross is not None:
        if target.codec.name not in Q8_0_WEIGHTS:
            raise ValueError(f"{target.codec.name} weights take Q8_K/Q8_1 activations, not Q8_0")
        # W* = W (C + δI)(H_q + δI)⁻¹ (H_q symmetric): the dampening δ, as the blend, a ridge towards W itself
        c = stats.cross.to(torch.float32).clone()
        c.diagonal().add_(blend)                                    # h holds the blend already
        w = least_squares_target(w, c, h, params.damp * float(h.diagonal().mean()))
        w[:, dead] = 0.0
    order = group_aware_order(h.diagonal(), target.codec.block) if params.group_aware else None
    hp = h if order is None else h[order][:, order]
    upper, damp = inverse_cholesky(hp, params.damp, params.damp_retries, params.damp_growth)
    if upper is None:
        log.warning("GPTQ head: Cholesky failed even with damp %.3g; the head stays plain", damp)
        return {}
    res = gptq_on_grid(w, upper, target.codec, importance, params.block_size, order)
    log.info("GPTQ head %s onto %s (%s, embed_weight %g%s): loss %.4g damp %.3g", target.name, target.codec.name,
             "tied" if target.tied else "untied", embed_weight, ", Q8_0 activations" if stats.cross is not None
             else "", res.loss, damp)
    return {target.name: res.data}
