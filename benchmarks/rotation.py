"""The rotation lever of issue #20 (QuaRot / SpinQuant style, weight-only), measured before it is productised.

A Llama-family decoder's residual stream can be rotated by any orthogonal Q without changing the model's
function, with everything fused into the weights (no online transform, a standard checkpoint):

    every RMSNorm's weight is folded into the Linears that read it (q, k, v; gate, up; the head), then
    embedding      E  <- E Q                 (tokens write the rotated stream)
    readers        W  <- W Q                 (q, k, v, gate, up, lm_head: W is (out, in))
    writers        W  <- Q^T W               (o_proj, down_proj)

RMSNorm(h Q) = RMSNorm(h) Q once its weight is 1, so each block computes the rotated stream of the original.
The final norm's weight goes into the head, which unties a tied embedding (the head is then E diag(g) Q and is
stored beside the embedding: a larger file). Post-norms on a block's outputs (Gemma 2/3: the sub-block output is
normed before it joins the stream) do not commute with Q, so the rotation applies to pre-norm blocks only.

Q: a randomised Hadamard matrix, diag(signs) H / sqrt(n), H a Kronecker product of Sylvester (2^k) and Paley
(q + 1, q a prime = 3 mod 4) matrices (576 = 4 x 12 x 12), or a random orthogonal matrix (`--rotation random`).

    .venv/bin/python benchmarks/rotation.py --rows rtn-w4g64,gptq-w4g64 --variants none,fold,hadamard --threads 1

Each variant's rotated fp32 model is written once to --work; each row is quantized from it with quantkit's API and
scored against the ORIGINAL base on the fixed protocol (40 test windows). JSON lines go to
benchmarks/results/rotation.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _proc import cpu_s, peak_mib  # noqa: E402
from quality import parse_row  # noqa: E402  (benchmarks/quality.py: the row names)

log = logging.getLogger("benchmarks.rotation")


# ------------------------------------------------------------------------------------------- Hadamard matrices
def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def paley(n: int) -> Tensor:
    """Paley I Hadamard matrix of order n = q + 1, q a prime = 3 mod 4 (entries +-1)."""
    q = n - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"no Paley I matrix of order {n}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i), antisymmetric for q = 3 mod 4
    h = torch.ones(n, n, dtype=torch.float64)
    h[1:, 0] = -1
    h[1:, 1:] = jac + torch.eye(q, dtype=torch.float64)
    return h


def hadamard(n: int) -> Tensor | None:
    """A +-1 Hadamard matrix of order n, or None when this construction has none."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h
    for p in range(n, 2, -1):
        if n % p or p % 4 or not (_is_prime(p - 1) and (p - 1) % 4 == 3):
            continue
        rest = hadamard(n // p)
        if rest is not None:
            return torch.kron(rest, paley(p))
    return None


def rotation(n: int, kind: str, seed: int = 0) -> Tensor:
    """An (n, n) orthogonal float64 matrix: randomised Hadamard, random orthogonal, or the identity."""
    gen = torch.Generator().manual_seed(seed)
    if kind in ("none", "fold"):
        return torch.eye(n, dtype=torch.float64)
    if kind == "hadamard":
        h = hadamard(n)
        if h is None:
            raise SystemExit(f"no Hadamard matrix of order {n} from Sylvester x Paley; use --variants random")
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return signs[:, None] * h / n ** 0.5
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    raise SystemExit(f"unknown variant {kind}")


# ------------------------------------------------------------------------------------------- the transform
@torch.no_grad()
def rotate_llama(model: nn.Module, q: Tensor) -> None:
    """Fold every norm into its readers and rotate the residual stream by q, in place (float64 maths)."""
    core = model.model
    cfg = model.config
    if any(hasattr(layer, "post_feedforward_layernorm") for layer in core.layers):
        raise SystemExit("post-norm blocks (Gemma 2/3) do not commute with a residual rotation")

    def read(lin: nn.Linear, g: Tensor) -> None:
        w = lin.weight.double() * g[None, :]
        lin.weight.copy_((w @ q).to(lin.weight.dtype))

    def write(lin: nn.Linear) -> None:
        lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))

    emb = core.embed_tokens.weight
    head_w = model.lm_head.weight.detach().double().clone()  # before the embedding moves (tied or not)
    emb.copy_((emb.double() @ q).to(emb.dtype))
    for layer in core.layers:
        g1 = layer.input_layernorm.weight.double()
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            read(lin, g1)
        layer.input_layernorm.weight.fill_(1.0)
        write(layer.self_attn.o_proj)
        g2 = layer.post_attention_layernorm.weight.double()
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            read(lin, g2)
        layer.post_attention_layernorm.weight.fill_(1.0)
        write(layer.mlp.down_proj)
    gf = core.norm.weight.double()
    core.norm.weight.fill_(1.0)
    head = nn.Linear(head_w.shape[1], head_w.shape[0], bias=False, dtype=emb.dtype)
    head.weight.copy_(((head_w * gf[None, :]) @ q).to(emb.dtype))
    cfg.tie_word_embeddings = False
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().tie_word_embeddings = False
    model.lm_head = head
    getattr(model, "_tied_weights_keys", None) and setattr(model, "_tied_weights_keys", [])


def build(model_name: str, variant: str, work: Path, seed: int) -> Path:
    """The variant's fp32 model folder (written once), checked against the original on one window."""
    out = work / f"{model_name}-{variant}"
    if (out / "config.json").is_file():
        return out
    from quantkit.calib.data import test_windows
    from quantkit.models.sources import load_model, resolve

    base, tok = load_model(resolve(model_name), torch.float32)
    model, _ = load_model(resolve(model_name), torch.float32)
    if variant != "none":
        rotate_llama(model, rotation(model.config.hidden_size, variant, seed))
    x = test_windows(tok, seqlen=512, max_windows=1)[:1]
    with torch.no_grad():
        a, b = base(x).logits, model(x).logits
    rel = float((a - b).norm() / a.norm())
    log.info("%s: logits relative difference to the original %.2e", variant, rel)
    if rel > 1e-4:
        raise SystemExit(f"{variant}: the transformed model differs from the original ({rel:.2e})")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_row(folder: Path, row: str, out: Path, nsamples: int, seqlen: int) -> dict:
    from quantkit.api import quantize

    method, scheme, options = parse_row(row)
    t0, c0 = time.perf_counter(), cpu_s()
    summary = quantize(str(folder), method, out, scheme=scheme, options=dict(options), device="cpu",
                       force=True, calib={"dataset": "wiki-vital", "nsamples": nsamples, "seqlen": seqlen, "seed": 0})
    return {"quant_wall_s": time.perf_counter() - t0, "quant_cpu_s": cpu_s() - c0, "size_bytes": summary["size_bytes"]}


def score(model_name: str, folders: list[Path], windows: int) -> list[dict]:
    import quantkit
    from quantkit.calib.data import test_windows
    from quantkit.eval.quality import evaluate
    from quantkit.models.sources import load_model, resolve

    base, tok = load_model(resolve(model_name), torch.float32)
    wins = test_windows(tok, seqlen=512, max_windows=windows)
    out = []
    for f in folders:
        model = quantkit.load(str(f), dtype=torch.float32, kernel="reference")
        q = evaluate([model], wins, base=base)[0]
        out.append({"ppl": q.ppl, "kl": q.kl, "top1": q.top1})
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="rtn-w4g64,gptq-w4g64")
    ap.add_argument("--variants", default="none,fold,hadamard")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-rotation"))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    results = ROOT / "benchmarks" / "results" / "rotation.jsonl"
    for variant in a.variants.split(","):
        folder = build(a.model, variant, a.work, a.seed)
        for row in a.rows.split(","):
            ckpt = a.work / f"{a.model}-{variant}-{row}"
            rec = {"model": a.model, "variant": variant, "row": row, "tag": a.tag, **run_row(folder, row, ckpt,
                                                                                          a.nsamples, a.seqlen)}
            rec.update(score(a.model, [ckpt], a.windows)[0])
            rec["peak_rss_mib"] = peak_mib()
            log.info("%s", rec)
            with results.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
