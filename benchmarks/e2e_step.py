"""CPU seconds of SignRound's end-to-end step (not a test): a model's decoder Linears at RTN w4g64, then
`tune_end_to_end` on 16 calibration windows, 2 a step, bf16 autocast, compiled KL, one thread. The first (compiling)
step is timed apart. Compare two versions of the code by running this with each on PYTHONPATH, one after the other.

    .venv/bin/python benchmarks/e2e_step.py gemma3-270m 4
"""
import sys, time, resource, logging, torch
from torch import nn
from quantkit.calib.data import calibration_samples
from quantkit.grid import rtn_quantize
from quantkit.methods.e2e.tune import E2EParams, tune_end_to_end
from quantkit.models.sources import load_model, resolve
logging.basicConfig(level=logging.INFO, format="%(message)s")
torch.set_num_threads(1)
name, steps = sys.argv[1], int(sys.argv[2])
base, tok = load_model(resolve(name), torch.float32)
model, _ = load_model(resolve(name), torch.float32)
q = {}
for n, m in model.named_modules():
    if isinstance(m, nn.Linear) and ".layers." in n:
        q[n] = rtn_quantize(m.weight, 4, 64, False); m.weight.data.copy_(q[n].dequantize())
samples = calibration_samples(tok, "wiki-vital", 16, 512, 0)
def cpu(): r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
p = E2EParams(steps=1, batch_size=2, autocast=torch.bfloat16, compile=True)
c0 = cpu(); tune_end_to_end(model, base, q, samples, p); c1 = cpu()
p = E2EParams(steps=steps, batch_size=2, autocast=torch.bfloat16, compile=True, seed=1)
c2 = cpu(); out = tune_end_to_end(model, base, q, samples, p); c3 = cpu()
print(f"RESULT {name} first(compile) {c1-c0:.1f} CPU s; {steps} steps {c3-c2:.1f} CPU s = {(c3-c2)/steps:.2f}/step; scale sum {sum(float(v.scales.double().sum()) for v in out.values()):.6f}")
