"""CPU seconds of the end-to-end stage's step (not a test): a model's decoder Linears at RTN w4g64, the float
model's teacher built once (not timed), then `tune_end_to_end` on 16 calibration windows, float32 (or --bf16),
compiled KL, one thread. The first (compiling) step is timed apart. Each --fraction (`E2EParams.token_fraction`)
is timed in the same process, one after the other, from the same RTN start.

    .venv/bin/python benchmarks/e2e_step.py gemma3-270m --steps 2 --batch 4 --fraction 1,0.25
"""
import argparse
import logging
import resource

import torch
from torch import nn

from quantkit.calib.data import calibration_samples
from quantkit.grid import rtn_quantize
from quantkit.methods.e2e.tune import E2EParams, teacher_of, tune_end_to_end
from quantkit.models.sources import load_model, resolve


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--fraction", default="1", help="comma list of token fractions")
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    dt = torch.bfloat16 if a.bf16 else None
    base, tok = load_model(resolve(a.model), torch.float32)
    model, _ = load_model(resolve(a.model), torch.float32)
    float_w = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layers." in n}
    samples = calibration_samples(tok, "wiki-vital", 16, 512, 0)
    teacher = teacher_of(base, model, samples, E2EParams(batch_size=a.batch, autocast=dt))
    del base
    for f in (float(x) for x in a.fraction.split(",")):
        q = {}
        with torch.no_grad():
            for n, w in float_w.items():
                q[n] = rtn_quantize(w, 4, 64, False)
                model.get_submodule(n).weight.copy_(q[n].dequantize())
        p = E2EParams(steps=1, batch_size=a.batch, autocast=dt, compile=True, token_fraction=f)
        c0 = cpu()
        tune_end_to_end(model, teacher, q, samples, p)
        c1 = cpu()
        p = E2EParams(steps=a.steps, batch_size=a.batch, autocast=dt, compile=True, seed=1, token_fraction=f)
        tune_end_to_end(model, teacher, q, samples, p)
        c2 = cpu()
        per = (c2 - c1) / a.steps
        logging.info("RESULT %s fraction %g batch %d: first (compiling) step %.1f CPU s; %d steps %.1f CPU s = %.2f a "
                     "step, %.2f a window", a.model, f, a.batch, c1 - c0, a.steps, c2 - c1, per, per / a.batch)


if __name__ == "__main__":
    main()
