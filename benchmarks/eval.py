"""Benchmark: evaluation throughput of `quantkit eval` vs a plain Hugging Face loop, and the cost of KL + top-1.

All runners score the same windows of smollm2-135m (first `--windows` non-overlapping
512-token windows of wiki-vital's test text, fp32, CPU):
- "HF loop": `model(input_ids=w, labels=w).loss` per window under torch.no_grad
  (what a user writes by hand);
- "quantkit ppl": `evaluate_paths([model])`, no base: ppl only;
- "quantkit ppl+KL+top-1": `evaluate_paths([model], base=model)` with the base's
  log-probs already in the cache (the usual case from the second checkpoint on),
  so the time is the checkpoint's scoring against the float16 spill;
- "quantkit base pass": the one-off base scoring that writes the spill.
Times are the scoring loops only (model load excluded, the same for all), repeated
`--repeats` times in interleaved order; medians are quoted (the CPU is shared).
Also checks the float16 spill against the exact float32 recompute path on an RTN
w4g64 checkpoint, and runs lm-eval's HF backend only if lm-eval is installed.

    flock /tmp/quantkit-heavy.lock .venv/bin/python benchmarks/eval.py            # 16 windows x 3 repeats
    flock /tmp/quantkit-heavy.lock .venv/bin/python benchmarks/eval.py --windows 4 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import quantkit
from quantkit.eval import protocol
from quantkit.eval.runner import evaluate_paths
from quantkit.models.sources import load_model, resolve

log = logging.getLogger("benchmarks.eval")

MODEL = "smollm2-135m"


@torch.no_grad()
def hf_loop(model, windows: torch.Tensor) -> tuple[float, float]:
    """(seconds, ppl) of the plain loop: mean of per-window losses (windows of equal length)."""
    t0 = time.perf_counter()
    losses = [float(model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss) for w in windows]
    return time.perf_counter() - t0, math.exp(sum(losses) / len(losses))


def lm_eval_rolling(model, tok, windows: torch.Tensor) -> dict[str, Any] | None:
    """lm-eval's HF backend, loglikelihood_rolling over the windows' text (only when lm-eval is installed)."""
    if importlib.util.find_spec("lm_eval") is None:
        return None
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, max_length=int(windows.shape[1]), batch_size=1, device="cpu")
    texts = [tok.decode(w) for w in windows]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    lls = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    seconds = time.perf_counter() - t0
    ntok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"seconds": seconds, "tokens": ntok, "ppl": math.exp(-sum(lls) / ntok)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    load_start = os.getloadavg()[0]
    t_all = time.perf_counter()

    src = resolve(MODEL)
    model, tok = load_model(src)
    ev = protocol.build(tok, seqlen=512, max_windows=args.windows)
    tokens = ev.scored_tokens
    kw = dict(max_windows=args.windows, seqlen=512, device="cpu")
    times: dict[str, list[float]] = {"hf": [], "ppl": [], "kl": []}
    ppl: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        first = evaluate_paths([], base=MODEL, cache_root=cache, **kw)
        base_row = first["rows"][0]
        spill_mb = sum(f.stat().st_size for f in cache.rglob("*.f16")) / 1e6
        for r in range(args.repeats):
            s, ppl["hf"] = hf_loop(model, ev.windows)
            times["hf"].append(s)
            row = evaluate_paths([src.path], **kw)["rows"][0]
            times["ppl"].append(row["eval_seconds"])
            ppl["ppl"] = row["ppl"]
            row = evaluate_paths([src.path], base=MODEL, cache_root=cache, **kw)["rows"][1]
            times["kl"].append(row["eval_seconds"])
            ppl["kl"], kl_self = row["ppl"], row["kl"]
            log.info("repeat %d: hf %.1f s, ppl %.1f s, kl %.1f s", r + 1, times["hf"][-1], times["ppl"][-1],
                     times["kl"][-1])
        rtn = Path(tmp) / "rtn-w4g64"
        quantkit.quantize(MODEL, "rtn", rtn, scheme="w4g64", device="cpu")
        spilled = evaluate_paths([str(rtn)], base=MODEL, cache_root=cache, **kw)["rows"][1]
        exact = evaluate_paths([str(rtn)], base=MODEL, cache=False, cache_budget_gb=0.0, **kw)["rows"][1]
    lm = lm_eval_rolling(model, tok, ev.windows)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}
    overhead = 100.0 * (med["kl"] / med["ppl"] - 1.0)
    lines = [
        f"# Evaluation throughput on {MODEL}",
        "",
        f"Same {args.windows} non-overlapping 512-token windows of wiki-vital's test text ({tokens} predicted tokens), "
        f"fp32, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}. Scoring loops only (model load "
        f"excluded); median of {args.repeats} interleaved repeats. The CPU is shared with other jobs "
        f"(load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end): ratios measured side by side "
        "hold better than absolute seconds.",
        "",
        f"Produced by `flock /tmp/quantkit-heavy.lock .venv/bin/python benchmarks/eval.py --windows {args.windows} "
        f"--repeats {args.repeats}` in {(time.perf_counter() - t_all) / 60:.1f} min.",
        "",
        "| runner | median s | tokens/s | × HF loop | ppl | runs (s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    names = {"hf": "plain HF loop (`labels=` loss)", "ppl": "quantkit eval, ppl only",
             "kl": "quantkit eval, ppl + KL + top-1 (base spill cached)"}
    for k in ("hf", "ppl", "kl"):
        lines.append(f"| {names[k]} | {med[k]:.2f} | {tps[k]:.0f} | {tps[k] / tps['hf']:.3f} | {ppl[k]:.4f} | "
                     f"{', '.join(f'{t:.1f}' for t in times[k])} |")
    lines.append(f"| quantkit base pass (ppl + writing the spill, once per base) | {base_row['eval_seconds']:.2f} | "
                 f"{tokens / base_row['eval_seconds']:.0f} | {tokens / base_row['eval_seconds'] / tps['hf']:.3f} | "
                 f"{base_row['ppl']:.4f} | 1 run |")
    if lm is None:
        lines.append("| lm-eval HF backend | not installed (not installed for this benchmark) | | | | |")
    else:
        lines.append(f"| lm-eval HF backend (loglikelihood_rolling, {lm['tokens']} tokens) | {lm['seconds']:.2f} | "
                     f"{lm['tokens'] / lm['seconds']:.0f} | {lm['tokens'] / lm['seconds'] / tps['hf']:.3f} | "
                     f"{lm['ppl']:.4f} | 1 run |")
    lines += [
        "",
        f"- KL + top-1 overhead over ppl only: **{overhead:+.1f}%** (target: at most +15%).",
        f"- quantkit ppl-only throughput vs the plain HF loop: **{tps['ppl'] / tps['hf']:.3f}×** (target: ≥ 1).",
        f"- Base spill: {spill_mb:.0f} MB of float16 log-probs for {tokens} tokens "
        f"(vocabulary {model.config.vocab_size:,}); "
        f"KL of the base against its own spill: {kl_self:.2e}.",
        f"- Spill accuracy on RTN w4g64: KL {spilled['kl']:.6f} / p99 {spilled['kl_p99']:.4f} / top-1 "
        f"{spilled['top1']:.2f}% against the float16 spill vs KL {exact['kl']:.6f} / p99 {exact['kl_p99']:.4f} / "
        f"top-1 {exact['top1']:.2f}% with the base recomputed in float32 "
        f"(relative KL difference {abs(spilled['kl'] / exact['kl'] - 1):.1e}); "
        f"recompute path scoring time {exact['eval_seconds']:.1f} s vs {spilled['eval_seconds']:.1f} s with the spill.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
