"""Starting points for SignRound's tuning other than round-to-nearest: the `--init` lever of signround_levers.py
(measured in benchmarks/results/quality.md, session 10: neither paid, so they stay out of the method).

Pure tensor functions (shapes as in algorithm.py: W (out, in), G = in / group_size groups per row):

- `search_clip`: per group, the clipping factor (alpha = beta = c, from a fixed list of candidates) that
  minimises the importance-weighted squared error of the rounded group, sum_j h_j (w_j - q(w_j))^2, with
  h (in,) the mean x_j^2 of the Linear's inputs (llama.cpp's imatrix; AWQ's clip search in weight space).
- `gptq_offsets`: GPTQ's codes on a fixed grid (the clipped one), turned into rounding offsets v, so that
  the tuning starts from GPTQ's error-compensated rounding rather than from the nearest one.

Both return values that `Rounding` takes as they are: the tuned weight at step 0 is exactly the start.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.methods.signround.algorithm import Rounding

CLIP_CANDIDATES = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5


@torch.no_grad()
def search_clip(weight: Tensor, importance: Tensor, bits: int, group_size: int, sym: bool,
                clip_min: float = 0.5) -> tuple[Tensor, Tensor]:
    """(alpha, beta), each (out, G): the best shared clipping factor of every group."""
    st = Rounding.start(weight, bits, group_size, sym)
    out_f, in_f = st.weight.shape
    g = in_f // st.group_size
    h = importance.float().to(st.weight.device).view(1, g, st.group_size)
    best = torch.full((out_f, g), float("inf"), device=st.weight.device)
    best_c = torch.ones(out_f, g, device=st.weight.device)
    for c in (c for c in CLIP_CANDIDATES if c >= clip_min - 1e-9):
        st.alpha.fill_(c)
        st.beta.fill_(c)
        err = ((st.fake_weight() - st.weight).view(out_f, g, st.group_size).pow(2) * h).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_c = torch.where(better, torch.full_like(best_c, c), best_c)
    return best_c.clone(), best_c.clone()


@torch.no_grad()
def gptq_offsets(weight: Tensor, hessian: Tensor, alpha: Tensor, beta: Tensor, bits: int, group_size: int,
                 sym: bool, damp: float = 0.01, block: int = 128) -> Tensor:
    """Rounding offsets v (out, in) in [-1/2, 1/2] that reproduce GPTQ's codes on the grid (alpha, beta) gives.

    GPTQ (column by column, error spread by the upper Cholesky factor of H^-1) with every group's scale and
    zero fixed beforehand. A code more than half a step from W / s (GPTQ's error feedback can push it there)
    is brought to the nearest code the offsets can reach.
    """
    st = Rounding(weight.detach().float(), torch.zeros_like(weight, dtype=torch.float32), alpha.float(), beta.float(),
                  bits, group_size if group_size != -1 else weight.shape[1], sym)
    scale, zero, _ = st.grid()                                  # (out, G, 1)
    out_f, in_f = st.weight.shape
    gs = st.group_size
    maxq = (1 << bits) - 1
    s_col = scale.squeeze(-1).repeat_interleave(gs, dim=1)      # (out, in)
    z_col = zero.squeeze(-1).repeat_interleave(gs, dim=1)
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True).float()
    w = st.weight.clone()
    codes = torch.empty_like(w)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        wb = w[:, i1:i2].clone()
        err = torch.empty_like(wb)
        for i in range(i2 - i1):
            j = i1 + i
            q = torch.clamp(torch.round(wb[:, i] / s_col[:, j]) + z_col[:, j], 0, maxq)
            codes[:, j] = q
            e = (wb[:, i] - s_col[:, j] * (q - z_col[:, j])) / u[j, j]
            wb[:, i + 1:] -= e[:, None] * u[j, j + 1:i2][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    v = (codes - z_col) - st.weight / s_col
    return v.clamp_(-0.5, 0.5)
