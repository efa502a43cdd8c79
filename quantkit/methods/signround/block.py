"""One decoder block's SignRound tuning: the quantized block, fed the quantized model's inputs, is tuned
to reproduce the float block's outputs on the float model's inputs.

Pure with respect to run state: everything comes in as arguments and the results go out; the block
is left computing with its quantized weights (and its tuned norms, when `tune_norms` is on).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from quantkit.calib.pipeline import _first
from quantkit.grid import QuantizedWeight
from quantkit.methods.signround.algorithm import Rounding
from quantkit.methods.signsgd import linear_decay, sign_step_
from quantkit.methods.signround.transform import Scales, fold_scales, scaled, start_scales
from quantkit.models.arch import AWQMapping

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignRoundParams:
    """Everything one block's tuning needs to know.

    iters:       signed-gradient steps per block (AutoRound's default is 200).
    lr:          step size of v, alpha, beta; None: 1 / iters (AutoRound's default), decayed linearly to 0.
    batch_size:  calibration windows per step.
    clip_min:    the smallest alpha / beta (how far clipping may shrink a group's range).
    tune_norms:  also tune the block's norm weights (float, stored as they are: the checkpoint stays standard).
    norm_lr:     Adam step size of the norm weights.
    autocast:    dtype the block computes in while tuning (bfloat16 on CPUs/GPUs that are fast at it), or None.
    compile:     run the step's forward and backward through torch.compile (one graph serves every block of
                 the same shape; the compiled maths is the same rounding, so `finalize` is unchanged).
    scale_lr:    Adam step size of learned equivalent scales (transform.py) on the block's mappings; 0: off.
    loss:        "mse" (AutoRound's), "token": each token's error relative to its own mean square, or "fisher":
                 "token" with the output channels weighted by the float model's Fisher (`_mse`).
    keep:        "best": the state of the step with the lowest batch loss (AutoRound's rule); "last": the final state.
    momentum:    signed steps along a running mean of the gradients (Signum) instead of the last one; 0: off.
    seed:        order of the windows.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    iters: int = 200
    lr: float | None = None
    batch_size: int = 8
    clip_min: float = 0.5
    tune_norms: bool = False
    norm_lr: float = 1e-3
    autocast: torch.dtype | None = None
    compile: bool = False
    keep: str = "best"
    scale_lr: float = 0.0
    loss: str = "mse"
    momentum: float = 0.0
    seed: int = 0

    def grid_of(self, name: str) -> tuple[int, int]:
        """(bits, group_size) of every Linear: the one grid (`tune_block`'s default `grid_of`)."""
        return self.bits, self.group_size


def block_norms(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's 1-D float weights outside its Linears (RMSNorm / LayerNorm weights), by parameter name."""
    linear_params = {id(m.weight) for m in block.modules() if isinstance(m, nn.Linear)}
    return {n: p for n, p in block.named_parameters()
            if p.ndim == 1 and id(p) not in linear_params and n.endswith("weight") and "norm" in n}


def _mse(out: Tensor, target: Tensor, loss: str = "mse", channels: Tensor | None = None) -> Tensor:
    """The block's output error. "mse": over every element. "token": each token's squared error relative to
    its own mean square (what the next RMSNorm divides by), so that a few tokens with massive activations
    (an attention sink's residual can carry 95% of a window's squared norm) do not decide the rounding alone.
    "fisher": "token" with each channel's squared error weighted by `channels` (hidden,), mean 1: the float
    model's Fisher profile of the block's outputs (`quantkit.calib.fisher.block_output_fisher`), so the error
    goes where the model's output is least sensitive to it (uniform `channels`: "token" exactly)."""
    t = target.float()
    err = (out.float() - t).pow(2)
    if loss in ("token", "fisher"):
        if loss == "fisher" and channels is not None:
            err = err * channels
        return (err.mean(-1) / t.pow(2).mean(-1).clamp(min=1e-12)).mean()
    return err.mean()


Grid = tuple[tuple[tuple[str, int], ...], bool]  # ((relative name, bits) per tuned Linear, sym): plain values
GridOf = Callable[[str], tuple[int, int]]  # relative Linear name -> its (bits, group_size) (per-module grids)


def block_loss(block: nn.Module, tensors: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]], grid: Grid,
               x: Tensor, target: Tensor, args: tuple, kwargs: dict[str, Any], autocast: torch.dtype | None,
               scales: tuple[tuple, ...] = (), loss: str = "mse", channels: Tensor | None = None) -> Tensor:
    """The block's output error with every Linear at its fake-quantized weight: a pure function of tensors
    (name -> (master, v, alpha, beta); the group size is in / alpha's columns), so that one compiled graph serves
    every block of the same shape. `grid`: each Linear's bits, and sym (`Grid`); `scales`: learned equivalent
    scales (transform.py), each as the tuple of its fields (plain values, so that the compiled graph is shared
    across blocks); `channels`: the "fisher" loss's channel weights (`_mse`)."""
    bits, sym = dict(grid[0]), grid[1]
    masters, extra = scaled(block, {n: t[0] for n, t in tensors.items()}, [Scales(*t) for t in scales])
    weights = {f"{n}.weight": Rounding(masters[n], v, a, b, bits[n], w.shape[1] // a.shape[1], sym).fake_weight()
               for n, (w, v, a, b) in tensors.items()}
    weights.update(extra)
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else nullcontext()
    with ctx:
        out = _first(functional_call(block, weights, (x, *args), kwargs))
    return _mse(out, target, loss, channels)


@torch.enable_grad()  # the block pipeline runs under no_grad
def tune_block(block: nn.Module, linears: dict[str, nn.Linear], masters: dict[str, Tensor], inputs: Tensor,
               targets: Tensor, args: tuple, kwargs: dict[str, Any], p: SignRoundParams,
               mappings: list[AWQMapping] | None = None,
               start: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
               grid_of: GridOf | None = None, channels: Tensor | None = None) -> dict[str, QuantizedWeight]:
    """Tune the rounding of `linears` (relative name -> Linear of `block`) and return their codes.

    `mappings` (the architecture's usable ones for this block): where learned equivalent scales may fold,
    used when `p.scale_lr` > 0; the tuned scales end folded into the block's norms and codes.

    inputs, targets: (N, T, hidden) on the block's device; `args`/`kwargs` are the block's other inputs
    for a batch of `p.batch_size` windows. On return every Linear holds its dequantized weight.
    `start`: relative name -> (v, alpha, beta) to start from instead of round-to-nearest (the `--init` lever
    of benchmarks/signround_levers.py).
    `grid_of`: each Linear's own (bits, group_size) where the scheme gives Linears theirs (`--target-bpw`);
    None: p.bits and p.group_size for all.
    `channels`: (hidden,) weights of the block's output channels for `p.loss` "fisher" (`_mse`); None: uniform.
    """
    t0 = time.perf_counter()
    if channels is not None:
        channels = channels.to(inputs.device, torch.float32)
    grids = {n: (grid_of or p.grid_of)(n) for n in linears}
    states = {n: Rounding.start(masters[n], *grids[n], p.sym) for n in linears}
    for n, (v, alpha, beta) in (start or {}).items():
        st = states[n]
        st.v, st.alpha, st.beta = (t.to(st.v.device, st.v.dtype).clone() for t in (v, alpha, beta))
    for s in states.values():
        for t in s.params():
            t.requires_grad_(True)
    norms = block_norms(block) if p.tune_norms else {}
    norm_start = {n: w.detach().clone() for n, w in norms.items()}
    scales = start_scales(block, mappings or [], set(linears)) if p.scale_lr > 0 else []
    groups = [{"params": list(norms.values()), "lr": p.norm_lr}] if norms else []
    groups += [{"params": [sc.log_s for sc in scales], "lr": p.scale_lr}] if scales else []
    opt = torch.optim.Adam(groups) if groups else None
    for w in norms.values():
        w.requires_grad_(True)
    lr = p.lr if p.lr is not None else 1.0 / max(p.iters, 1)
    n = inputs.shape[0]
    bs = min(p.batch_size, n)
    gen = torch.Generator().manual_seed(p.seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    best_loss, best = float("inf"), None
    first_loss = None
    momenta: dict[int, Tensor] = {}
    loss_fn = torch.compile(block_loss, dynamic=False) if p.compile else block_loss
    tensors = {k: (s.weight, s.v, s.alpha, s.beta) for k, s in states.items()}
    grid: Grid = (tuple(sorted((n, b) for n, (b, _) in grids.items())), p.sym)
    scale_args = tuple((sc.prev, sc.linears, sc.prev_is_linear, sc.norm_offset, sc.log_s) for sc in scales)
    for step in range(p.iters):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + bs]
        pos += bs
        loss = loss_fn(block, tensors, grid, inputs[idx], targets[idx], args, kwargs, p.autocast, scale_args, p.loss,
                       channels)
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        improved, best_loss = value < best_loss, min(best_loss, value)
        if improved and p.keep == "best":  # AutoRound keeps the state of the best step's batch
            best = ({k: s.snapshot() for k, s in states.items()},
                    {k: w.detach().clone() for k, w in norms.items()}, [sc.log_s.detach().clone() for sc in scales])
        loss.backward()
        sign_step_([t for s in states.values() for t in s.params()], linear_decay(lr, step, p.iters), momenta,
                   p.momentum)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for s in states.values():
            s.clamp_(p.clip_min)
    if best is not None:
        for k, s in states.items():
            s.restore(best[0][k])
        with torch.no_grad():
            for k, w in norms.items():
                w.copy_(best[1][k])
            for sc, t in zip(scales, best[2], strict=True):
                sc.log_s.copy_(t)
    for w in norms.values():
        w.requires_grad_(False)
    if scales:
        with torch.no_grad():
            eff, _ = scaled(block, {k: s.weight for k, s in states.items()}, scales)
        for k, s in states.items():
            s.weight = eff[k].detach()
        fold_scales(block, scales)
    out: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        for name, lin in linears.items():
            qw = states[name].finalize(lin.bias)
            lin.weight.data.copy_(qw.dequantize(lin.weight.dtype))
            out[name] = qw
    moved = max((float((w - norm_start[k]).abs().max()) for k, w in norms.items()), default=0.0)
    spread = max((float(sc.log_s.detach().abs().max()) for sc in scales), default=0.0)
    log.info("signround: %d Linears, loss %.4g -> best %.4g, norms moved %.3g, |log s| max %.3g, %.1fs", len(out),
             first_loss or 0.0, best_loss, moved, spread, time.perf_counter() - t0)
    return out
