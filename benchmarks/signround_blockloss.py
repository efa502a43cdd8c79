"""Block-level proxy for SignRound's tuning efficiency (not a test): the held-out loss of single blocks.

The KL of a whole quantized model moves by about +-10% between proxies of a few blocks, too much to rank
optimizer settings. This driver isolates the optimizer instead: for a few decoder blocks of the real model it
takes the float model's inputs and outputs on the 64 calibration windows, tunes each block on the first
`--train` windows with every variant, and scores the tuned block on the remaining (held-out) windows with the
token loss (and the mse). The same windows, the same block and the same start for every variant: the
differences are the variant's. One line per (variant, block) goes to benchmarks/results/signround-blockloss.jsonl.

Variants are `;`-separated lists of `key=value` over SignRoundParams (iters, batch_size, lr, momentum...) plus
`crop=N`: tune on the first N positions of each window only (causal attention: those positions' outputs are
exactly what a window of N tokens gives), with the block's other inputs captured for N tokens.

    .venv/bin/python benchmarks/signround_blockloss.py --blocks 3,14,25 \
        --variants "iters=50;iters=25;iters=25,momentum=0.9;iters=50,crop=256,batch_size=16"
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import time
from pathlib import Path

import torch

from quantkit.calib.data import calibration_samples
from quantkit.calib.pipeline import _first, capture_inputs
from quantkit.methods.signround.block import SignRoundParams, _mse, tune_block
from quantkit.models.arch import block_linears, get_arch, get_blocks
from quantkit.models.sources import load_model, resolve

OUT = Path(__file__).parent / "results" / "signround-blockloss.jsonl"
log = logging.getLogger("bench.blockloss")


def parse_variant(text: str) -> tuple[dict, int | None]:
    kv = dict(item.split("=", 1) for item in text.split(",") if item)
    crop = int(kv.pop("crop")) if "crop" in kv else None
    fields = SignRoundParams.__dataclass_fields__
    out = {}
    for k, v in kv.items():
        if k not in fields:
            raise SystemExit(f"unknown parameter {k}")
        default = fields[k].default
        if isinstance(default, bool):
            out[k] = v.lower() in ("1", "true", "on", "yes")
        else:
            out[k] = type(default)(v) if default is not None else float(v)
    return out, crop


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@torch.no_grad()
def run_block(block, x, args, kwargs, bs: int, autocast) -> torch.Tensor:
    outs = []
    for i in range(0, x.shape[0], bs):
        ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            outs.append(_first(block(x[i:i + bs], *args, **kwargs)).float())
    return torch.cat(outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="3,14,25")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--gs", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load_model(resolve(a.model), torch.float32)
    spec = get_arch(model)
    samples = calibration_samples(tok, "wiki-vital", 64, 512, 0)
    blocks = get_blocks(model, spec)
    wanted = sorted(int(b) for b in a.blocks.split(","))
    variants = [(v, *parse_variant(v)) for v in a.variants.split(";")]
    crops = {c for _, _, c in variants if c is not None}
    inp = capture_inputs(model, spec, samples, 8, torch.device("cpu"))
    short = {c: capture_inputs(model, spec, samples[:8, :c], 8, torch.device("cpu")) for c in crops}
    x = torch.cat(inp.hidden)
    base = SignRoundParams(bits=a.bits, group_size=a.gs, sym=a.sym, iters=50, batch_size=8, tune_norms=True,
                           autocast=torch.bfloat16, compile=True, loss="token")
    for i, blk in enumerate(blocks):
        if i > wanted[-1]:
            break
        kw = inp.kwargs_for(i)
        y = run_block(blk, x, inp.args, kw, 8, None)
        if i in wanted:
            for name, over, crop in variants:
                p = SignRoundParams(**{**base.__dict__, **over, "seed": i})
                b = copy.deepcopy(blk)
                lin = dict(block_linears(b, spec))
                masters = {n: m.weight.detach().float().clone() for n, m in lin.items()}
                xt, yt = x[:a.train], y[:a.train]
                args, kwt = inp.args, kw
                if crop is not None:
                    xt, yt = xt[:, :crop].contiguous(), yt[:, :crop].contiguous()
                    args, kwt = short[crop].args, short[crop].kwargs_for(i)
                c0, t0 = cpu_s(), time.perf_counter()
                tune_block(b, lin, masters, xt, yt, args, kwt, p)
                c1, t1 = cpu_s(), time.perf_counter()
                yh = run_block(b, x[a.train:], inp.args, kw, 8, None)
                row = {"tag": a.tag, "model": a.model, "block": i, "variant": name, "bits": a.bits, "sym": a.sym,
                       "held_token": float(_mse(yh, y[a.train:], "token")),
                       "held_mse": float(_mse(yh, y[a.train:], "mse")), "cpu_s": round(c1 - c0, 1),
                       "wall_s": round(t1 - t0, 1)}
                log.info("%s", row)
                with OUT.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        x = y


if __name__ == "__main__":
    main()
