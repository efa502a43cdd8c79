"""End-to-end tuning of the float parts of a quantized model against the float model's logits.

After block-wise rounding, the integer codes and zero points are fixed. What stays float in every standard
checkpoint is tuned here on the whole model at once (EfficientQAT's E2E-QP stage, with norms added):

    scales     (out, G) per quantized Linear, as s = s0 * exp(t)  (t starts at 0; stored back in fp16)
    norms      the decoder blocks' and the final norm's weights
    embedding  optionally (`embedding_lr` > 0): the token embedding and the output layer, which a checkpoint
               keeps in float too (one tensor when they are tied)

The loss is KL(base || quantized) over the full vocabulary on the calibration windows, the same quantity the
evaluator reports. The teacher's final hidden states come from the float model, computed once before the tuning
(`teacher_of`), so the float model is freed before the tuning loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.func import functional_call

from quantkit.grid import QuantizedWeight
from quantkit.methods.e2e.norms import RelativeNorms, norm_params
from quantkit.methods.signsgd import linear_decay, sign_step_, ste_half

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class E2EParams:
    """steps: optimizer steps (0: off); batch_size: windows per step; lr: Adam step of log-scales and norms;
    rounding_lr: signed-gradient step of the rounding offsets (0: the codes stay as the blocks left them);
    embedding_lr: Adam step of the token embedding and output layer (0: they stay the float model's);
    logit_chunk: tokens whose logits are alive at once (the vocabulary makes them the largest tensors);
    compile: the KL over each chunk's logits through torch.compile (its fp32 log-softmaxes fused: 1.3x a step);
    token_fraction: share of a step's token positions whose logits enter the KL, drawn afresh each step (1: all).
    The decoder still runs every position; only the vocabulary-sized products shrink, which on a large vocabulary
    (Gemma 3's 262k) are most of a step."""

    steps: int = 32
    batch_size: int = 2
    lr: float = 1e-3
    norm_lr: float = 1e-3
    norms: str = "additive"  # additive: Adam on the norm weights; relative: on log-gains; off: the norms stay
    rounding_lr: float = 0.0
    embedding_lr: float = 0.0
    logit_chunk: int = 256
    autocast: torch.dtype | None = None
    compile: bool = False
    seed: int = 0
    token_fraction: float = 1.0


def _keep_off_zero(s: Tensor, eps: float = 1e-6) -> Tensor:
    """A scale kept at least `eps` away from 0 on its own side (symmetric grids store negative scales)."""
    return torch.where(s < 0, s.clamp(max=-eps), s.clamp(min=eps))


def _embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """The token embedding's and the output layer's weights, once each (one parameter when they are tied)."""
    out: list[nn.Parameter] = []
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        if m is not None and all(m.weight is not q for q in out):
            out.append(m.weight)
    return out


@contextmanager
def only_grads(model: nn.Module, params: list[Tensor]) -> Iterator[None]:
    """Within the block, of `model`'s parameters only `params` take gradients (the tied embedding / lm_head
    would otherwise cost a vocabulary-sized weight gradient every step, accumulated for nothing); the
    flags are restored on the way out, exceptions included."""
    was = [(w, w.requires_grad) for w in model.parameters()]
    try:
        for w, _ in was:
            w.requires_grad_(False)
        for w in params:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in was:
            w.requires_grad_(flag)


def _kl_sum(teacher: Tensor, student: Tensor) -> Tensor:
    """Sum over tokens of KL(teacher || student), both (tokens, vocab) logits."""
    t = torch.log_softmax(teacher.float(), -1)
    s = torch.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum()


def _kl_sum_and_grad(teacher: Tensor, student: Tensor) -> tuple[Tensor, Tensor]:
    """`_kl_sum` and its gradient in the student's logits, softmax(student) - softmax(teacher), in float32."""
    t = torch.log_softmax(teacher.float(), -1)
    s = torch.log_softmax(student.float(), -1)
    pt = t.exp()
    return (pt * (t - s)).sum(), s.exp() - pt


@dataclass(frozen=True)
class Head:
    """A frozen output layer: logits = cap * tanh((h W^T + b) / cap) (no soft-cap when cap is None)."""

    weight: Tensor
    bias: Tensor | None
    cap: float | None

    def __call__(self, h: Tensor) -> Tensor:
        z = F.linear(h.to(self.weight.dtype), self.weight, self.bias)
        return torch.tanh(z / self.cap) * self.cap if self.cap else z

    def pre_cap_grad(self, grad_z: Tensor, z: Tensor) -> Tensor:
        """d(loss)/d(h W^T + b) from d(loss)/d(logits) `grad_z` at the logits `z` this head gave, in the weight's
        dtype: times the weight it is d(loss)/dh, its transpose times h is d(loss)/dW."""
        g = grad_z * (1 - (z.float() / self.cap).pow(2)) if self.cap else grad_z
        return g.to(self.weight.dtype)


def _head(model: nn.Module, dtype: torch.dtype | None = None) -> Head:
    """The model's hidden state -> logits map: its output embedding, then its logit soft-capping if any.

    `dtype`: the autocast dtype, in which the (frozen) output weight is held once, rather than cast afresh for
    every chunk of logits (a vocabulary-sized copy, 13 times a step)."""
    head = model.get_output_embeddings()
    w = head.weight.detach()
    b = None if getattr(head, "bias", None) is None else head.bias.detach()
    if dtype is not None:
        w = w.to(dtype)
        b = None if b is None else b.to(dtype)
    return Head(w, b, getattr(model.config, "final_logit_softcapping", None))


def _same_head(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models' output layers compute the same logits (same weight, bias and soft-cap)."""
    ha, hb = a.get_output_embeddings(), b.get_output_embeddings()
    ba, bb = getattr(ha, "bias", None), getattr(hb, "bias", None)
    return (getattr(a.config, "final_logit_softcapping", None) == getattr(b.config, "final_logit_softcapping", None)
            and torch.equal(ha.weight, hb.weight) and (ba is None) == (bb is None)
            and (ba is None or torch.equal(ba, bb)))


class _ChunkedKL(torch.autograd.Function):
    """Mean KL over tokens, with its gradient in the student's hidden states computed in the forward pass, a chunk of
    logits at a time: per chunk three vocabulary-sized products (the two heads' logits and the gradient's
    product), against five when the chunk is recomputed for autograd, and one pass of softmaxes. With
    `head_weight` (the student head's weight as a parameter) a fourth product gives the gradient in it."""

    @staticmethod
    def forward(ctx, student_h: Tensor, teacher_h: Tensor, teacher_head: Head, student_head: Head, chunk: int,
                kl_and_grad: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], head_weight: Tensor | None) -> Tensor:
        n = student_h.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=student_h.device)
        grads = []
        grad_w = None if head_weight is None else torch.zeros_like(head_weight, dtype=torch.float32)
        with torch.no_grad():
            for i in range(0, n, chunk):
                h = student_h[i:i + chunk]
                zs = student_head(h)
                kl, gz = kl_and_grad(teacher_head(teacher_h[i:i + chunk]), zs)
                total += kl
                g = student_head.pre_cap_grad(gz, zs)
                grads.append(g @ student_head.weight)
                if grad_w is not None:
                    grad_w += (g.t() @ h.to(g.dtype)).float()
        ctx.save_for_backward(torch.cat(grads).to(student_h.dtype), grad_w)
        ctx.n, ctx.w_dtype = n, None if head_weight is None else head_weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        gw = None if grad_w is None else (grad_w * scale).to(ctx.w_dtype)
        return grad_h * scale.to(grad_h.dtype), None, None, None, None, None, gw


def chunked_kl(teacher_h: Tensor, student_h: Tensor, teacher_head: Head, student_head: Head, chunk: int,
               kl_and_grad: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = _kl_sum_and_grad,
               head_weight: Tensor | None = None) -> Tensor:
    """Mean over tokens of KL(teacher || student) from the final hidden states (..., hidden), `chunk` tokens of
    logits at a time: memory holds one chunk's logits, not all of them. Differentiable in `student_h`, and in
    `head_weight` when given (the parameter `student_head.weight` is a copy of); the teacher's head is frozen.
    `kl_and_grad`: `_kl_sum_and_grad` or a compiled copy of it."""
    th, sh = teacher_h.reshape(-1, teacher_h.shape[-1]), student_h.reshape(-1, student_h.shape[-1])
    return _ChunkedKL.apply(sh, th.detach(), teacher_head, student_head, chunk, kl_and_grad, head_weight)


@dataclass(frozen=True)
class Teacher:
    """The float model's side of the end-to-end loss, computed once: its final hidden states on every calibration
    window (N, T, hidden; in the autocast dtype: 38 MB for SmolLM2's 64 x 512 windows) and its output layer.
    Once it is built the float model can be freed: the tuning loop holds two models' worth of weights no longer,
    and a window seen twice (batch 4 x 32 steps is two passes over 64 windows) is not run through it twice.
    `same_head`: the student's output layer computes the same logits, so one low-precision copy serves both."""

    hidden: Tensor
    head: Head
    same_head: bool
    weights: dict[str, Tensor] = field(default_factory=dict)  # float weights the rounding lever starts from


@torch.no_grad()
def teacher_of(base: nn.Module, student: nn.Module, samples: Tensor, p: E2EParams,
               weights: Iterable[str] = ()) -> Teacher:
    """`Teacher` of `base` on `samples` (N, T token ids), `p.batch_size` windows a pass, under `p.autocast`;
    `weights`: Linears whose float weights it keeps (the rounding lever, `p.rounding_lr` > 0)."""
    dev = next(base.parameters()).device
    ctx = (lambda: torch.autocast(dev.type, dtype=p.autocast)) if p.autocast else nullcontext
    outs = []
    for i in range(0, samples.shape[0], p.batch_size):
        with ctx():
            h = base.base_model(input_ids=samples[i:i + p.batch_size].to(dev), use_cache=False).last_hidden_state
        outs.append(h.to(p.autocast or h.dtype))
    kept = {n: base.get_submodule(n).weight.detach().float().clone() for n in weights}
    return Teacher(torch.cat(outs), _head(base, p.autocast), _same_head(base, student), kept)


@torch.enable_grad()
def tune_end_to_end(model: nn.Module, base: nn.Module | Teacher, quantized: dict[str, QuantizedWeight], samples: Tensor,
                    p: E2EParams) -> dict[str, QuantizedWeight]:
    """Tune the scales of `quantized` (full Linear name -> codes, as `model` holds them) and the norms of `model`.

    `base`: the float model, or its `Teacher` on `samples` (built by `teacher_of`, so the caller can free it first).

    `model` computes with the dequantized weights of `quantized` on entry and with the tuned ones on return.
    Returns the codes (tuned too when `p.rounding_lr` > 0) with the tuned scales (exactly representable in fp16).
    """
    if p.steps <= 0 or not quantized:
        return quantized
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    codes = {n: (qw.codes.to(dev).float() - qw.zeros.to(dev).float()[:, qw.g_idx.long().to(dev)]) for n, qw in quantized.items()}
    s0 = {n: qw.scales.to(dev).float() for n, qw in quantized.items()}
    gidx = {n: qw.g_idx.long().to(dev) for n, qw in quantized.items()}
    logs = {n: torch.zeros_like(s, requires_grad=True) for n, s in s0.items()}
    # Rounding tuned as well: code = clamp(round(W/s - W/s0 + t + d), -z, maxq - z), which is the block stage's
    # code t while s = s0 and d = 0; d in [-1/2, 1/2] moves by signed steps, as in the block stage.
    offsets = {n: torch.zeros_like(c, requires_grad=True) for n, c in codes.items()} if p.rounding_lr > 0 else {}
    teacher = base if isinstance(base, Teacher) else teacher_of(base, model, samples, p, offsets)
    if missing := [n for n in offsets if n not in teacher.weights]:
        raise ValueError(f"end-to-end rounding: the teacher holds no float weight of {missing[0]} (teacher_of(weights=))")
    float_w = {n: teacher.weights[n].to(dev) for n in offsets}
    lo = {n: -qw.zeros.to(dev).float() for n, qw in quantized.items() if n in offsets}  # (out, G)
    hi = {n: ((1 << qw.bits) - 1) + lo[n] for n, qw in quantized.items() if n in offsets}

    def _tuned(n: str) -> Tensor:
        """The tuned (out, G) scales."""
        return _keep_off_zero(s0[n] * logs[n].exp())

    def _scale(n: str) -> Tensor:
        sc = _tuned(n)
        return (ste_half(sc) if offsets else sc)[:, gidx[n]]

    def _codes(n: str, sc: Tensor, final: bool = False) -> Tensor:
        """The code relative to the zero point: the block stage's while the rounding is not tuned."""
        if n not in offsets:
            return codes[n]
        w = float_w[n]
        x = w / sc - w / s0[n][:, gidx[n]] + codes[n] + offsets[n]
        q = torch.round(x) if final else x + (torch.round(x) - x).detach()
        return torch.minimum(torch.maximum(q, lo[n][:, gidx[n]]), hi[n][:, gidx[n]])

    # Without tuned rounding the codes are constants: held grouped (out, G, gs) in the dtype the step computes in
    # (small integers, exact in bf16), each weight is one broadcast product, with no gather of the scales and no
    # autocast copy of an fp32 weight (the two were 40% of a SmolLM2 step's time).
    wdtype = p.autocast or torch.float32
    grouped = {} if offsets else {n: codes[n].view(codes[n].shape[0], s0[n].shape[1], -1).to(wdtype)
                                  for n, qw in quantized.items() if qw.trivial_g_idx}

    def _weight(n: str) -> Tensor:
        if n in grouped:
            g = grouped[n]
            sc = _tuned(n).to(wdtype)
            return (g * sc.unsqueeze(-1)).view(g.shape[0], -1)
        sc = _scale(n)
        return sc * _codes(n, sc)

    prefix = decoder_prefix(model, quantized)

    def after_step(step: int) -> None:
        if offsets:
            sign_step_(list(offsets.values()), linear_decay(p.rounding_lr, step, p.steps))
            with torch.no_grad():
                for d in offsets.values():
                    d.clamp_(-0.5, 0.5)

    first, last = tuning_loop(model, teacher, samples, p, lambda: {n.removeprefix(prefix) + ".weight": _weight(n)
                                                                    for n in quantized},
                              [{"params": list(logs.values()), "lr": p.lr}], after_step)
    out = {}
    with torch.no_grad():
        for name, qw in quantized.items():
            scales = _tuned(name).half().float()
            if name in offsets:
                rel = _codes(name, _scale(name), final=True)
                qw = replace(qw, codes=(rel - lo[name][:, gidx[name]]).to(torch.uint8).cpu())
            out[name] = replace(qw, scales=scales.cpu())
            lin = model.get_submodule(name)
            lin.weight.data.copy_(out[name].dequantize(lin.weight.dtype))
    log.info("end-to-end: %d steps, KL %.4g -> %.4g, %.1fs", p.steps, first, last, time.perf_counter() - t0)
    return out


def _positions(teacher_h: Tensor, student_h: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The two models' final hidden states (..., hidden) as (tokens, hidden), at a random `fraction` of the
    positions (in order; at least one), the same positions for both; all of them, and no draw, when fraction is 1."""
    th, sh = teacher_h.reshape(-1, teacher_h.shape[-1]), student_h.reshape(-1, student_h.shape[-1])
    if fraction >= 1:
        return th, sh
    n = sh.shape[0]
    keep = torch.randperm(n, generator=gen)[:max(1, round(fraction * n))].sort().values.to(sh.device)
    return th[keep], sh[keep]


def decoder_prefix(model: nn.Module, names: Iterable[str]) -> str:
    """The decoder's prefix ("model."), checked to start every tuned Linear's name."""
    prefix = f"{model.base_model_prefix}."
    if not all(n.startswith(prefix) for n in names):
        raise ValueError(f"end-to-end: quantized Linears outside the decoder ({model.base_model_prefix})")
    return prefix


def tuning_loop(model: nn.Module, teacher: Teacher, samples: Tensor, p: E2EParams,
                weights: Callable[[], dict[str, Tensor]], groups: list[dict],
                after_step: Callable[[int], None] | None = None) -> tuple[float, float]:
    """`p.steps` Adam steps of `groups` (the caller's parameters), the norms and (with `p.embedding_lr`) the
    embedding against the teacher's logits, the step size decaying linearly to 0. `weights()`: the tuned Linears'
    weights this step, by name under the decoder (`layers.0.mlp.up_proj.weight`), as `functional_call` takes them.
    Returns the first and the last step's loss."""
    dev = next(model.parameters()).device
    t_head = teacher.head
    # the usual case (the head is not quantized): one low-precision copy of it, not two
    embeddings = _embedding_params(model) if p.embedding_lr > 0 else []
    head_weight = model.get_output_embeddings().weight if embeddings else None
    # with the embedding tuned, the student's head is rebuilt every step (below)
    s_head = t_head if teacher.same_head and not embeddings else _head(model, p.autocast)
    kl_sum = torch.compile(_kl_sum_and_grad, dynamic=False) if p.compile else _kl_sum_and_grad
    norms = norm_params(model) if p.norms != "off" else {}
    groups = list(groups)
    relative = RelativeNorms(model, norms) if p.norms == "relative" and norms else None
    if relative is not None:
        groups.append({"params": list(relative.logs.values()), "lr": p.norm_lr})
    elif norms:  # additive (off leaves `norms` empty)
        groups.append({"params": list(norms.values()), "lr": p.norm_lr})
    if embeddings:
        groups.append({"params": embeddings, "lr": p.embedding_lr})
    opt = torch.optim.Adam(groups)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / p.steps)  # linear to 0 over the run
    gen = torch.Generator().manual_seed(p.seed)
    n = samples.shape[0]
    order, pos = torch.randperm(n, generator=gen), 0
    ctx = (lambda: torch.autocast(dev.type, dtype=p.autocast)) if p.autocast else nullcontext
    first = last = float("nan")
    with only_grads(model, (list(norms.values()) if relative is None else []) + embeddings):
        for step in range(p.steps):
            if pos + p.batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            picked = order[pos:pos + p.batch_size]
            batch = samples[picked].to(dev)
            pos += p.batch_size
            now = weights() if relative is None else {**weights(), **relative.weights()}
            if embeddings:  # the head as it stands this step, in the dtype the step computes in
                s_head = _head(model, p.autocast)
            with ctx():
                student = functional_call(model.base_model, now, (), {"input_ids": batch, "use_cache": False})
                th, sh = _positions(teacher.hidden[picked].to(dev), student.last_hidden_state, p.token_fraction,
                                    gen)
                loss = chunked_kl(th, sh, t_head, s_head, p.logit_chunk, kl_sum, head_weight)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(step)
            last = float(loss.detach())
            first = last if step == 0 else first
            log.debug("end-to-end step %d: KL %.4g", step, last)
            decay.step()
    if relative is not None:
        relative.store()
    return first, last
