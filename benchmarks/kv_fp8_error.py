"""Why an FP8 KV cache costs what it costs (issue #25): the relative error e4m3 puts on each layer's keys and values.

Runs the model on 2 calibration windows, takes each attention layer's keys (after the key norm and RoPE) and
values where transformers hands them to the attention function, and prints per layer: max|x|, the share of
values below e4m3's smallest normal at scale = max/448, and the relative error ||fp8(x) - x|| / ||x|| with that
scale and with the best of 0.5, 0.25, 0.1, 0.05 times it (clipping the largest values).

    .venv/bin/python benchmarks/kv_fp8_error.py --model gemma3-270m
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


def main() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    model, tok = load_model(resolve(a.model))
    seen: list[tuple[Tensor, Tensor]] = []

    def attention(module, query, key, value, *args, **kwargs):
        seen.append((key.detach().float(), value.detach().float()))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("kv-fp8-error", attention)
    AttentionMaskInterface.register("kv-fp8-error", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None:
            cfg._attn_implementation = "kv-fp8-error"
    with torch.no_grad():
        model(calibration_samples(tok, nsamples=2, seqlen=512, seed=0))
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
