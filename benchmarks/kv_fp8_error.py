"""Why an FP8 KV cache costs what it costs (issue #25): the relative error e4m3 puts on each layer's keys and values.

Runs the model on 2 calibration windows, takes each attention layer's keys (after the key norm and RoPE) and
values where transformers hands them to the attention function, and prints per layer: max|x|, the share of
values below e4m3's smallest normal at scale = max/448, and the relative error ||fp8(x) - x|| / ||x|| with that
scale and with the best of 0.5, 0.25, 0.1, 0.05 times it (clipping the largest values).

`--granularity` (session 14) compares, over all layers, the scale choices a checkpoint can carry: one scale per
layer (compressed-tensors' kv_cache_scheme strategy tensor, what quantkit writes) or one per KV head (strategy
attn_head, which vLLM's FlashAttention-3 backend reads), each at max/448 ("minmax") or at the least-squared-error
factor among 1 + k/32 of it ("mse", no clipping), and, as a reference no checkpoint carries, a dynamic scale per
token and head. Scales are fitted on the same 2 windows they are scored on.

    .venv/bin/python benchmarks/kv_fp8_error.py --model gemma3-270m
    .venv/bin/python benchmarks/kv_fp8_error.py --model smollm2-135m --granularity
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import Tensor

from quantkit.calib.data import calibration_samples
from quantkit.grid import FP8_MAX
from quantkit.models.sources import load_model, resolve

FP8_MIN_NORMAL = 2.0 ** -6
CLIPS = (1.0, 0.5, 0.25, 0.1, 0.05)


def fp8(x: Tensor, scale: Tensor) -> Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def rel(x: Tensor, y: Tensor) -> float:
    return float((y - x).norm() / x.norm())


def _mse_scale(x: Tensor, scale: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The scale among scale * (1 + k/32), k = 0..31, with the least squared FP8 error, per slice over `dims`."""
    best, best_err = scale, (fp8(x, scale) - x).square().sum(dims, keepdim=True)
    for k in range(1, 32):
        s = scale * (1 + k / 32)
        err = (fp8(x, s) - x).square().sum(dims, keepdim=True)
        best, best_err = torch.where(err < best_err, s, best), torch.minimum(err, best_err)
    return best


def granularity(seen: list[tuple[Tensor, Tensor]]) -> None:
    """Relative error sqrt(sum ||fp8(x) - x||^2 / sum ||x||^2) over every layer's keys (values) per scale choice."""
    whole, head, tok = (0, 1, 2, 3), (0, 2, 3), (3,)  # x: (batch, kv heads, tokens, head dim)
    choices = {"tensor, minmax": (whole, False), "tensor, mse": (whole, True), "attn_head, minmax": (head, False),
               "attn_head, mse": (head, True), "token x head, dynamic (reference)": (tok, False)}
    logging.info("| scale choice | keys: rel. error | values: rel. error |")
    logging.info("|---|---:|---:|")
    for name, (dims, search) in choices.items():
        cells = []
        for which in (0, 1):
            num = den = 0.0
            for kv in seen:
                x = kv[which]
                scale = x.abs().amax(dims, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
                if search:
                    scale = _mse_scale(x, scale, dims)
                num += float((fp8(x, scale) - x).square().sum())
                den += float(x.square().sum())
            cells.append(f"{(num / den) ** 0.5:.5f}")
        logging.info("| %s | %s | %s |", name, *cells)


def record_kv(model: torch.nn.Module, name: str) -> list[tuple[Tensor, Tensor]]:
    """Route `model`'s attention through an SDPA wrapper registered as `name` that records every call's keys
    (after the rotary embedding) and values, in float32; returns the list the calls append to."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    seen: list[tuple[Tensor, Tensor]] = []

    def attention(module, query, key, value, *args, **kwargs):
        seen.append((key.detach().float(), value.detach().float()))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None:
            cfg._attn_implementation = name
    return seen


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--granularity", action="store_true", help="compare per-layer / per-head / mse scales instead")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    model, tok = load_model(resolve(a.model))
    seen = record_kv(model, "kv-fp8-error")
    with torch.no_grad():
        model(calibration_samples(tok, nsamples=2, seqlen=512, seed=0))
    if a.granularity:
        return granularity(seen)
    logging.info("| layer | tensor | max abs | below min normal | rel. error, max/448 | best clipped |")
    logging.info("|---:|---|---:|---:|---:|---:|")
    for i, (k, v) in enumerate(seen):
        for name, x in (("key", k), ("value", v)):
            amax = x.abs().amax()
            scale = amax / FP8_MAX
            below = float((x.abs() < scale * FP8_MIN_NORMAL).float().mean())
            best = min(rel(x, fp8(x, scale * c)) for c in CLIPS)
            logging.info("| %d | %s | %.3g | %.4f | %.4f | %.4f |", i, name, float(amax), below, rel(x, fp8(x, scale)), best)


if __name__ == "__main__":
    main()
