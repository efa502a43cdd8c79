"""More end-to-end steps on a finished quantkit GPTQ checkpoint (an experiment driver, not a test).

The stored codes and zero points stay; the scales and norms are tuned again against the float model's logits on
the protocol's calibration windows (`quantkit.methods.e2e.tune`, the method's own stage), then the model is scored
as `benchmarks/quality.py` scores a row (40 test windows, KL over the full vocabulary against the fp32 base). It
answers "would more end-to-end steps have paid on this row?" without re-running the row's block stage. One
grid per checkpoint (no `dynamic` config). Results are appended to benchmarks/results/e2e-more.jsonl.

    .venv/bin/python benchmarks/e2e_more.py CKPT --steps 32 --batch 4 --threads 1 --tag s17-w4-more32
    .venv/bin/python benchmarks/e2e_more.py CKPT --steps 32 --batch 4 --embedding-lr 1e-4 --no-before --tag s20-emb
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.calib.data import calibration_samples, test_windows
from quantkit.compute import can_compile
from quantkit.eval.quality import evaluate
from quantkit.formats.specs import get_format
from quantkit.methods.e2e.tune import E2EParams, teacher_of, tune_end_to_end
from quantkit.models.arch import blocks_linears, get_arch
from quantkit.models.sources import load_model, resolve

OUT = Path(__file__).parent / "results" / "e2e-more.jsonl"
PACKED = ("qweight", "qzeros", "scales", "g_idx")


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def student_from(folder: Path, model_name: str):
    """The float model with the checkpoint's norms and dequantized Linears, and the Linears' codes."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if qc.get("dynamic"):
        raise SystemExit("e2e_more: per-module grids (a dynamic config) are not read here")
    layout, scheme = get_format("gptq").read(qc)
    model, tok = load_model(resolve(model_name), torch.float32)
    tensors = stored_tensors(folder)
    quantized = {}
    for name, lin in blocks_linears(model, get_arch(model), lambda n: f"{n}.qweight" not in tensors).items():
        qw = layout.unpack({k: tensors[f"{name}.{k}"] for k in PACKED}, scheme.bits, scheme.group_size, scheme.sym)
        quantized[name] = qw
        with torch.no_grad():
            lin.weight.copy_(qw.dequantize(torch.float32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name in tensors:  # the tuned norms (stored in the save dtype)
                p.copy_(tensors[name].to(p.dtype))
    return model, tok, quantized


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1, help="batch order of the extra steps (the row's stage used 0)")
    ap.add_argument("--embedding-lr", type=float, default=0.0, help="tune the embedding too (E2EParams.embedding_lr)")
    ap.add_argument("--token-fraction", type=float, default=1.0,
                    help="share of each step's positions in the KL (E2EParams.token_fraction)")
    ap.add_argument("--no-before", action="store_true", help="skip scoring the checkpoint as read")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    student, tok, quantized = student_from(Path(a.checkpoint), a.model)
    samples = calibration_samples(tok, "wiki-vital", a.nsamples, 512, 0)
    p = E2EParams(steps=a.steps, batch_size=a.batch, lr=a.lr, norm_lr=a.lr, compile=can_compile(torch.device("cpu")),
                  seed=a.seed, embedding_lr=a.embedding_lr, token_fraction=a.token_fraction)
    base, _ = load_model(resolve(a.model), torch.float32)
    windows = test_windows(tok, seqlen=512, max_windows=a.windows)
    before = evaluate([student], windows, base=base)[0] if a.steps and not a.no_before else None
    teacher = teacher_of(base, student, samples, p)
    tune_end_to_end(student, teacher, quantized, samples, p)
    tuned_cpu = time.process_time() - c0
    r = evaluate([student], windows, base=base)[0]
    res = {"tag": a.tag, "checkpoint": a.checkpoint, "args": vars(a), "cpu_s": round(tuned_cpu, 1),
           "wall_s": round(time.perf_counter() - t0, 1), "ppl": r.ppl, "kl": r.kl, "top1": r.top1,
           "before": None if before is None else {"ppl": before.ppl, "kl": before.kl, "top1": before.top1}}
    logging.info("%s", json.dumps(res))
    with OUT.open("a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
