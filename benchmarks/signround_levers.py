"""Lever measurements for SignRound on smollm2-135m (not a test): the experiment driver behind the levers table
of benchmarks/results/quality.md. It runs the block loop itself (float and quantized streams side by side) so
that one lever can be switched at a time, then scores KL / ppl / top-1 on N test windows against the base.
`--blocks K` quantizes only the first K blocks (a cheaper proxy for ranking levers); `--save`/`--load` keep a
block stage to try end-to-end settings on. Results are appended to benchmarks/results/signround-levers.jsonl.

    .venv/bin/python benchmarks/signround_levers.py --iters 50 --bf16 --norms --tag sr50-norms
    .venv/bin/python benchmarks/signround_levers.py --iters 50 --bf16 --norms --e2e 32 --tag sr50-norms-e2e32
"""
import argparse, json, logging, sys, time, copy
import torch
from pathlib import Path

OUT = Path(__file__).parent / "results" / "signround-levers.jsonl"
from quantkit.models.sources import resolve, load_model
from quantkit.models.arch import get_arch, get_blocks, block_linears
from quantkit.calib.data import calibration_samples, test_windows
from quantkit.calib.pipeline import capture_inputs, _first, place_outside_blocks
from quantkit.eval.quality import evaluate
from quantkit.grid import rtn_quantize
from quantkit.methods.signround.block import SignRoundParams, tune_block
from quantkit.methods.scaling import usable_mappings

ap = argparse.ArgumentParser()
ap.add_argument("--bits", type=int, default=4); ap.add_argument("--gs", type=int, default=64)
ap.add_argument("--sym", action="store_true"); ap.add_argument("--iters", type=int, default=50)
ap.add_argument("--lr", type=float, default=None); ap.add_argument("--nsamples", type=int, default=64)
ap.add_argument("--bs", type=int, default=8); ap.add_argument("--windows", type=int, default=40)
ap.add_argument("--norms", action="store_true"); ap.add_argument("--norm-lr", type=float, default=1e-3)
ap.add_argument("--bf16", action="store_true"); ap.add_argument("--clip-min", type=float, default=0.5)
ap.add_argument("--blocks", type=int, default=None); ap.add_argument("--rtn", action="store_true")
ap.add_argument("--fp-inputs", action="store_true"); ap.add_argument("--e2e", type=int, default=0)
ap.add_argument("--save"); ap.add_argument("--load")
ap.add_argument("--e2e-lr", type=float, default=1e-3); ap.add_argument("--e2e-bs", type=int, default=2); ap.add_argument("--e2e-norm-lr", type=float, default=1e-3)
ap.add_argument("--e2e-rounding-lr", type=float, default=0.0)
ap.add_argument("--e2e-compile", action="store_true", help="the end-to-end KL through torch.compile (the method's default)")
ap.add_argument("--tag", default=""); ap.add_argument("--no-pre", action="store_true", help="skip scoring the block stage")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--emulate-casts", action="store_true", help="torch._inductor emulate_precision_casts (with --compile)")
ap.add_argument("--init", default="rtn", choices=["rtn", "clip", "gptq", "clip-gptq"], help="tuning start (methods/signround/init.py)")
ap.add_argument("--loss", default="mse", choices=["mse", "token"])
ap.add_argument("--stream-bf16", action="store_true", help="float reference and quantized stream under bf16 autocast")
ap.add_argument("--scale-lr", type=float, default=0.0); ap.add_argument("--compile", action="store_true"); ap.add_argument("--keep", default="best")
a = ap.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
torch.manual_seed(0); torch.set_num_threads(a.threads)
src = resolve(a.model)
if a.emulate_casts:
    import torch._inductor.config as inductor_config
    inductor_config.emulate_precision_casts = True
model, tok = load_model(src, torch.float32)
spec = get_arch(model)
samples = calibration_samples(tok, "wiki-vital", a.nsamples, 512, 0)
t0 = time.perf_counter()
blocks = get_blocks(model, spec)
inp = capture_inputs(model, spec, samples, a.bs, torch.device("cpu"))
xq = torch.cat(inp.hidden); xf = xq.clone()
p = SignRoundParams(bits=a.bits, group_size=a.gs, sym=a.sym, iters=a.iters, lr=a.lr, batch_size=a.bs,
                    tune_norms=a.norms, norm_lr=a.norm_lr, autocast=torch.bfloat16 if a.bf16 else None,
                    clip_min=a.clip_min, compile=a.compile, keep=a.keep, loss=a.loss, scale_lr=a.scale_lr)
def starts(blk, lin, masters, x, args, kw):
    """(v, alpha, beta) per Linear from its inputs' XᵀX on the tuning inputs (--init)."""
    from signround_init import search_clip, gptq_offsets
    hs = {n: torch.zeros(m.in_features, m.in_features) for n, m in lin.items()}
    cnt = {"n": 0}
    def hook(n):
        def f(_m, args_):
            xx = args_[0].detach().reshape(-1, args_[0].shape[-1]).float()
            hs[n].addmm_(xx.t(), xx)
        return f
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in lin.items()]
    try:
        with torch.no_grad():
            for j in range(0, len(x), a.bs):
                blk(x[j:j + a.bs], *args, **kw)
                cnt["n"] += x[j:j + a.bs].shape[0] * x.shape[1]
    finally:
        for hd in handles:
            hd.remove()
    out = {}
    for n, m in lin.items():
        h = hs[n] / cnt["n"]
        w = masters[n].float()
        g = w.shape[1] // a.gs
        if "clip" in a.init:
            al, be = search_clip(w, h.diagonal(), a.bits, a.gs, a.sym, a.clip_min)
        else:
            al, be = torch.ones(w.shape[0], g), torch.ones(w.shape[0], g)
        v = gptq_offsets(w, h, al, be, a.bits, a.gs, a.sym) if "gptq" in a.init else torch.zeros_like(w)
        out[n] = (v, al, be)
    return out

qmodel = model  # quantized in place; base reloaded for eval
nb = a.blocks or len(blocks)
allq = {}
if a.load:
    st = torch.load(a.load, weights_only=False); model.load_state_dict(st["model"]); allq = st["q"]; nb = 0
for i in range(nb):
    blk = blocks[i]
    lin = block_linears(blk, spec)
    masters = {n: m.weight.detach().clone() for n, m in lin.items()}
    kw = inp.kwargs_for(i)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.stream_bf16)
    with torch.no_grad(), ac:
        yf = torch.cat([_first(blk(xf[j:j+a.bs], *inp.args, **kw)) for j in range(0, len(xf), a.bs)])
    if a.rtn:
        with torch.no_grad():
            for n, m in lin.items():
                m.weight.data.copy_(rtn_quantize(m.weight, a.bits, a.gs, a.sym).dequantize())
    else:
        maps = usable_mappings(blk, spec, set(lin)) if a.scale_lr else None
        start = starts(blk, lin, masters, xf if a.fp_inputs else xq, inp.args, kw) if a.init != "rtn" else None
        res = tune_block(blk, lin, masters, xf if a.fp_inputs else xq, yf, inp.args, kw, p, maps, start)
        allq.update({f"{spec.blocks}.{i}.{k}": v for k, v in res.items()})
    with torch.no_grad(), ac:
        xq = torch.cat([_first(blk(xq[j:j+a.bs], *inp.args, **kw)) for j in range(0, len(xq), a.bs)])
    xf = yf
if a.save:
    torch.save({"model": model.state_dict(), "q": allq}, a.save)
base, _ = load_model(src, torch.float32)
wins = test_windows(tok, "wiki-vital", 512, a.windows)
if a.e2e and not a.no_pre:
    r0 = evaluate([qmodel], wins, base=base)[0]
    res0 = dict(tag=a.tag + "-pre-e2e", args=vars(a), quant_s=round(time.perf_counter() - t0, 1), ppl=r0.ppl, kl=r0.kl, top1=r0.top1)
    open(OUT, "a").write(json.dumps(res0) + "\n")
if a.e2e:
    from quantkit.methods.e2e.tune import E2EParams, tune_end_to_end
    tune_end_to_end(model, base, allq, samples, E2EParams(steps=a.e2e, batch_size=a.e2e_bs, lr=a.e2e_lr, norm_lr=a.e2e_norm_lr, rounding_lr=a.e2e_rounding_lr, compile=a.e2e_compile,
                    autocast=torch.bfloat16 if a.bf16 else None))
qs = time.perf_counter() - t0
logging.info("quantized in %.1f s", qs)
wins = test_windows(tok, "wiki-vital", 512, a.windows)
t1 = time.perf_counter()
r = evaluate([qmodel], wins, base=base)[0]
res = dict(tag=a.tag, args=vars(a), quant_s=round(qs, 1), ppl=r.ppl, kl=r.kl, top1=r.top1, eval_s=round(time.perf_counter() - t1, 1))
print(json.dumps(res)); open(OUT, "a").write(json.dumps(res) + "\n")
