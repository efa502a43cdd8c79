"""End-to-end tuning of a block format's float headers, the codes fixed (the stage on GGUF's grids).

A GGUF block stores its codes and integer sub-block scales beside one or two float16 numbers: the block scale d,
and for the types with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) a min m. Every decoder is linear in the two, so a
Linear's weight is, per block b of its row,

    W = d[b] * a + m[b] * b_part        a, b_part: fixed by the codes and sub-scales (`BlockCodec.parts`)

and d, m play the part the group scales play on a GPTQ grid: tuned by Adam as d = d0 * exp(t), m = m0 * exp(u)
(t, u start at 0; a zero stays zero), with the norms, against the float model's logits (`tune.tuning_loop`), then
stored back as float16. The file keeps its types, codes and sizes; only header bytes and norms change.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantkit.methods.e2e.tune import E2EParams, Teacher, decoder_prefix, tuning_loop

log = logging.getLogger(__name__)
F16_MAX = 65504.0


@dataclass(frozen=True)
class HeaderParts:
    """One Linear's weight on a block format: value = d[block] * a + m[block] * b.
    a, b: (out, in) float32; d, m: (out, blocks) float32 (float16 values); b and m are None for the types
    without a min."""

    a: Tensor
    b: Tensor | None
    d: Tensor
    m: Tensor | None

    def weight(self) -> Tensor:
        """The weight these parts decode to, (out, in) float32."""
        return _combine(self.a, self.d, self.b, self.m)


def _combine(a: Tensor, d: Tensor, b: Tensor | None, m: Tensor | None) -> Tensor:
    rows, nb = d.shape
    w = a.view(rows, nb, -1) * d.unsqueeze(-1).to(a.dtype)
    if b is not None and m is not None:
        w = w + b.view(rows, nb, -1) * m.unsqueeze(-1).to(b.dtype)
    return w.view(rows, -1)


def _half(x: Tensor) -> Tensor:
    """x stored as float16 (and read back as float32), kept finite."""
    return x.clamp(-F16_MAX, F16_MAX).half().float()


@torch.enable_grad()
def tune_headers(model: nn.Module, teacher: Teacher, parts: dict[str, HeaderParts], samples: Tensor,
                 p: E2EParams) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Tune each block's d and m of `parts` (full Linear name -> its weight's parts) and `model`'s norms against
    `teacher` (`tune.teacher_of` on `samples`). Returns {name: (d, m)} (out, blocks) float32 holding float16
    values (m None where the type has none); `model`'s Linears then compute with the tuned weights."""
    if p.steps <= 0 or not parts:
        return {n: (x.d, x.m) for n, x in parts.items()}
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    wdtype = p.autocast or torch.float32  # a and b are small integer products: exact in bf16 as in float32
    a = {n: x.a.to(dev, wdtype) for n, x in parts.items()}
    b = {n: x.b.to(dev, wdtype) for n, x in parts.items() if x.b is not None and x.m is not None}
    d0 = {n: x.d.to(dev).float() for n, x in parts.items()}
    m0 = {n: parts[n].m.to(dev).float() for n in b}  # type: ignore[union-attr]
    td = {n: torch.zeros_like(v, requires_grad=True) for n, v in d0.items()}
    tm = {n: torch.zeros_like(v, requires_grad=True) for n, v in m0.items()}

    def _d(n: str) -> Tensor:
        return d0[n] * td[n].exp()

    def _m(n: str) -> Tensor | None:
        return m0[n] * tm[n].exp() if n in tm else None

    prefix = decoder_prefix(model, parts)
    first, last = tuning_loop(
        model, teacher, samples, p,
        lambda: {n.removeprefix(prefix) + ".weight": _combine(a[n], _d(n), b.get(n), _m(n)) for n in parts},
        [{"params": [*td.values(), *tm.values()], "lr": p.lr}])
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    with torch.no_grad():
        for n, x in parts.items():
            d = _half(_d(n)).cpu()
            m = None if n not in tm else _half(_m(n)).cpu()  # type: ignore[arg-type]
            out[n] = (d, m)
            lin = model.get_submodule(n)
            lin.weight.data.copy_(_combine(x.a, d, x.b, m).to(lin.weight.dtype))
    log.info("end-to-end (block headers): %d steps, KL %.4g -> %.4g, %.1fs", p.steps, first, last,
             time.perf_counter() - t0)
    return out
