"""A rotation of the residual stream fused into the weights (QuaRot / SpinQuant's R1, weight-only use).

A pre-norm decoder computes the same function after its residual stream is rotated by any orthogonal Q (d x d),
once every RMSNorm's weight is folded into the Linears that read it:

    embedding            E <- E Q                  (V, d): tokens write the rotated stream
    readers of a norm    W <- W diag(g) Q          (out, d): q/k/v, gate/up, the output head; the norm's g <- 1
    writers              W <- Q^T W,  b <- b Q      (d, in): o_proj, down_proj

RMSNorm(h Q) = RMSNorm(h) Q for a norm without weight, so every block sees the rotated stream of the original and
every Linear's output is unchanged in exact arithmetic. What changes is what the quantizer sees: the readers'
columns and the writers' rows are mixed by Q, which spreads a few large input channels (massive activations,
norm weights far from 1) over all of them, so GPTQ's error feedback has an evenly conditioned problem.

The checkpoint stays a standard one (no online transform). The output head takes the final norm's weight, so a
tied embedding is untied: the head is stored beside the embedding (a larger file; the scheme's size figures
count it). Blocks whose sub-block outputs are normed before they join the stream (Gemma 2/3's post-norms) do not
commute with Q: their architectures have no `Residual` entry and are refused.

Q = diag(signs) H / sqrt(d), H a Hadamard matrix built as a Kronecker product of Sylvester (2^k) and Paley
(p = q + 1, q a prime = 3 mod 4) matrices: 576 = 4 x 12 x 12, 640 = 32 x 20, 896 = 32 x 28. Sizes it cannot
build fall back to a random orthogonal matrix ("random"), which spreads outliers as well but less evenly.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from quantkit.errors import SchemeError
from quantkit.models.arch import ArchSpec, architecture_name, get_blocks

log = logging.getLogger(__name__)

ROTATIONS: tuple[str, ...] = ("hadamard", "random")


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def paley(n: int) -> Tensor:
    """Paley's first construction: a +-1 Hadamard matrix of order n = q + 1, q a prime = 3 mod 4 (float64)."""
    q = n - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"no Paley I matrix of order {n}")
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # antisymmetric for q = 3 mod 4
    h = torch.ones(n, n, dtype=torch.float64)
    h[1:, 0] = -1
    h[1:, 1:] = jacobsthal + torch.eye(q, dtype=torch.float64)
    return h


def hadamard(n: int) -> Tensor | None:
    """A +-1 Hadamard matrix of order n (H H^T = n I, float64), or None where this construction has none."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    for p in range(n, 3, -1):  # the largest Paley factor first: few Kronecker levels
        if n % p == 0 and p % 4 == 0 and _is_prime(p - 1) and (p - 1) % 4 == 3:
            rest = hadamard(n // p)
            if rest is not None:
                return torch.kron(rest, paley(p))
    return None


def rotation_matrix(n: int, kind: str, seed: int = 0) -> Tensor:
    """An (n, n) orthogonal float64 matrix: "hadamard" (randomised signs; a random orthogonal matrix where no
    Hadamard matrix of order n is built here) or "random" (Haar, from a QR decomposition). Seeded."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        h = hadamard(n)
        if h is not None:
            signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
            return signs[:, None] * h / n ** 0.5
        log.warning("no Hadamard matrix of order %d here: a random orthogonal rotation instead", n)
    elif kind != "random":
        raise SchemeError(f"rotation {kind!r}: one of {', '.join(ROTATIONS)}")
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def check_rotatable(model: nn.Module, spec: ArchSpec) -> None:
    """SchemeError unless the model's residual stream can be rotated with everything fused into its weights."""
    if spec.residual is None:
        raise SchemeError(f"--rotate: {architecture_name(model)} has no rotation rule (its sub-block outputs are "
                          f"normed before they join the residual stream, or it is a mixture of experts)")
    if model.get_output_embeddings() is None:
        raise SchemeError("--rotate: the model has no output head to take the final norm")


@torch.no_grad()
def rotate_model(model: nn.Module, spec: ArchSpec, kind: str = "hadamard", seed: int = 0,
                 matrix: Tensor | None = None) -> None:
    """Rotate the residual stream of `model` in place (see the module docstring); maths in float64.
    `matrix`: an explicit (d, d) orthogonal matrix instead of `kind`'s (the identity folds the norms only)."""
    check_rotatable(model, spec)
    res = spec.residual
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    d = emb.weight.shape[1]
    q = rotation_matrix(d, kind, seed) if matrix is None else matrix.to(torch.float64)
    off = res.norm_offset

    def fold_read(lin: nn.Linear, g: Tensor) -> None:
        lin.weight.copy_(((lin.weight.double() * g[None, :]) @ q).to(lin.weight.dtype))

    def write(lin: nn.Linear) -> None:
        lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))

    head_w = head.weight.detach().double().clone()  # before a tied embedding moves
    head_b = None if getattr(head, "bias", None) is None else head.bias.detach().clone()
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    for block in get_blocks(model, spec):
        for norm_name, readers in res.readers:
            norm = block.get_submodule(norm_name)
            g = norm.weight.double() + off
            for name in readers:
                fold_read(block.get_submodule(name), g)
            norm.weight.fill_(1.0 - off)
        for name in res.writers:
            write(block.get_submodule(name))
    final = model.get_submodule(res.final_norm)
    gf = final.weight.double() + off
    final.weight.fill_(1.0 - off)
    untied = nn.Linear(d, head_w.shape[0], bias=head_b is not None, dtype=emb.weight.dtype, device=emb.weight.device)
    untied.weight.copy_(((head_w * gf[None, :]) @ q).to(untied.weight.dtype))
    if head_b is not None:
        untied.bias.copy_(head_b)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    model.set_output_embeddings(untied)
    log.info("rotated the residual stream (%s, %d x %d); the output head is stored untied", kind, d, d)
