"""How much 16-bit Hessian products change GPTQ, on real activations (issue #20).

SmolLM2's blocks run in bf16 on 64 x 512 calibration tokens; for a few Linears the Hessian is accumulated
both ways (float32 products, and bf16 products `--tokens` at a time, summed in float32). GPTQ then quantizes
the float32 weight against each, and both results are scored by the exact Hessian's loss tr(dW H dW^T).

    .venv/bin/python benchmarks/hessian_precision.py --tokens 512
"""

from __future__ import annotations

import argparse
import logging

import torch

from quantkit.calib.data import calibration_samples
from quantkit.methods.gptq import algorithm
from quantkit.methods.gptq.algorithm import GPTQParams, HessianAccumulator, gptq_quantize
from quantkit.models.sources import load_model, resolve

LAYERS = ("model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.8.self_attn.o_proj",
          "model.layers.15.self_attn.o_proj", "model.layers.15.mlp.down_proj", "model.layers.25.self_attn.o_proj",
          "model.layers.28.mlp.gate_proj", "model.layers.28.mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=algorithm.LOW_PRECISION_TOKENS, help="tokens per bf16 product")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    algorithm.LOW_PRECISION_TOKENS = a.tokens
    master, tok = load_model(resolve(a.model))
    weights = {n: master.get_submodule(n).weight.detach().float().clone() for n in LAYERS}
    model = master.to(torch.bfloat16)
    samples = calibration_samples(tok, nsamples=64, seqlen=512, seed=0)
    accs = {n: (HessianAccumulator(weights[n].shape[1], "cpu"),
                HessianAccumulator(weights[n].shape[1], "cpu", low_precision_products=True)) for n in LAYERS}

    def hook(n: str):
        def pre(_mod, args):
            for acc in accs[n]:
                acc.add(args[0].detach())
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in LAYERS]
    try:
        with torch.no_grad():
            for batch in samples.split(8):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    logging.info("| Linear | bits | |dH|/|H| | loss, float32 H | loss, bf16 H | ratio |")
    logging.info("|---|---:|---:|---:|---:|---:|")
    for n in LAYERS:
        h, hl = accs[n][0].hessian(), accs[n][1].hessian()
        w, rel = weights[n], float((hl - h).norm() / h.norm())
        for bits in (4, 3):
            p = GPTQParams(bits=bits, group_size=64, sym=False)
            losses = []
            for hh in (h, hl):
                d = w - gptq_quantize(w, hh, p).weight.dequantize(torch.float32)
                losses.append(float(torch.einsum("oi,ij,oj->", d, h, d)))
            logging.info("| %s | %d | %.2e | %.5g | %.5g | %.4f |", n, bits, rel, *losses, losses[1] / losses[0])


if __name__ == "__main__":
    main()
