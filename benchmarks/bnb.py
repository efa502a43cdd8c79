"""Benchmark: bitsandbytes nf4 / int8 on smollm2-135m under the peers' protocol.

Each row is quantized through `quantkit.quantize`, written to disk, reloaded with
`quantkit.load` (non-quantized tensors in fp32) and scored on the first 40
non-overlapping 512-token windows of wiki-vital's test text against the fp32 base
(ppl, KL(base || model), top-1 agreement). The table goes to benchmarks/results/bnb.md.

    .venv/bin/python benchmarks/bnb.py                      # rows nf4, int8, nf4-fp32
    .venv/bin/python benchmarks/bnb.py --rows nf4 --windows 4
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import quantkit
from quantkit.calib.data import test_windows
from quantkit.eval.quality import Quality, evaluate
from quantkit.formats.stats import checkpoint_stats
from quantkit.models.sources import load_model, resolve

log = logging.getLogger("benchmarks.bnb")

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Row:
    method: str
    options: dict[str, Any]
    save_dtype: str
    note: str


ROWS: dict[str, Row] = {
    "nf4": Row("nf4", {}, "float16", "double quant, fp32 compute on CPU; fp16 embeddings/norms (default)"),
    "int8": Row("int8", {}, "float16", "LLM.int8, threshold 6.0; fp16 embeddings/norms (default)"),
    "nf4-fp32": Row("nf4", {}, "float32", "as nf4 but embeddings/norms kept fp32, like a direct BitsAndBytesConfig load"),
    "nf4-nodq": Row("nf4", {"double_quant": False}, "float16", "no double quant (fp32 absmax per 64 weights)"),
    "fp4": Row("fp4", {}, "float16", "4-bit float e2m1, double quant"),
}
# Peer figures (/work/shared/peers/results.md): bitsandbytes through transformers directly, fp32 base.
PEERS: dict[str, tuple[float, float, float, float]] = {  # ppl, KL, top-1 %, ckpt MB
    "nf4": (18.715, 0.2674, 73.23, 172.1),
    "nf4-fp32": (18.715, 0.2674, 73.23, 172.1),
    "int8": (15.020, 0.0180, 92.97, 223.8),
}


def merge(parts: list[Quality]) -> Quality:
    """One Quality from scores of consecutive window chunks (token-weighted means; no p99)."""
    tokens = sum(q.tokens for q in parts)
    nll = sum(q.nll * q.tokens for q in parts) / tokens
    kl = sum(q.kl * q.tokens for q in parts) / tokens
    top1 = sum(q.top1 * q.tokens for q in parts) / tokens
    return Quality(ppl=math.exp(nll), nll=nll, tokens=tokens, kl=kl, top1=top1)


def table(results: list[dict[str, Any]], base_q: Quality, windows: int, seconds: float, total: int) -> str:
    lines = [
        f"# bitsandbytes methods on {MODEL}",
        "",
        f"Protocol: first {windows} non-overlapping 512-token windows of wiki-vital's test text, each scored on its own; "
        "KL(base || model) over the full vocabulary and top-1 agreement against the fp32 base; "
        f"checkpoints reloaded with `quantkit.load` (fp32 compute for non-quantized tensors). "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()} CPU "
        "shared with other jobs (seconds are noisy; the peers measured on an idle machine).",
        "",
        "Produced by `.venv/bin/python benchmarks/bnb.py` "
        f"(total {seconds / 60:.1f} min{'' if windows == total else f'; stopped early: {windows} of {total} windows'}).",
        "",
        "| row | method | options | stored non-quantized | quant s | ckpt MB | bits/weight | ppl | KL | top-1 % "
        "| peer ppl | peer KL | peer top-1 % | peer MB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 base | - | - | float32 | - | 541.6 | 32 | {base_q.ppl:.3f} | 0 | 100.00 | 14.817 | 0 | 100.00 | 541.6 |",
    ]
    for r in results:
        q: Quality = r["quality"]
        peer = PEERS.get(r["name"])
        peer_cells = f"{peer[0]:.3f} | {peer[1]:.4f} | {peer[2]:.2f} | {peer[3]:.1f}" if peer else "- | - | - | -"
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        lines.append(
            f"| {r['name']} | {r['method']} | {opts} | {r['save_dtype']} | {r['quantize_seconds']:.1f} "
            f"| {r['size_bytes'] / 1e6:.1f} | {r['bits_per_weight']:.3f} | {q.ppl:.3f} | {q.kl:.4f} | {q.top1:.2f} "
            f"| {peer_cells} |"
        )
    lines += ["", "Rows:"]
    lines += [f"- `{r['name']}`: {ROWS[r['name']].note}." for r in results]
    lines += [
        "",
        "bits/weight = every stored bit of the quantized Linears (codes, absmax, double-quant tables, quant_state "
        "blobs; int8: codes + fp32 row scales) / their weights, from `quantkit.formats.stats.checkpoint_stats`. "
        "ckpt MB = whole folder (tokenizer included).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="nf4,int8,nf4-fp32", help=f"comma list of: {', '.join(ROWS)}")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=4, help="windows per evaluation call (table rewritten after each)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bnb.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    base, tok = load_model(resolve(MODEL), torch.float32)
    windows = test_windows(tok, seqlen=512, max_windows=args.windows)
    results: list[dict[str, Any]] = []
    models = []
    with tempfile.TemporaryDirectory(prefix="quantkit-bench-bnb-") as tmp:
        for name in args.rows.split(","):
            row = ROWS[name]
            out = Path(tmp) / name
            summary = quantkit.quantize(MODEL, row.method, out, options=row.options, save_dtype=row.save_dtype,
                                        device="cpu")
            stats = checkpoint_stats(out)
            log.info("%s: %.1f s, %.1f MB, %.3f bits/weight", name, summary["quantize_seconds"],
                     stats["size_bytes"] / 1e6, stats["bits_per_weight"])
            results.append({"name": name, "method": row.method, "options": summary["options"],
                            "save_dtype": row.save_dtype, "quantize_seconds": summary["quantize_seconds"],
                            "size_bytes": stats["size_bytes"], "bits_per_weight": stats["bits_per_weight"]})
            models.append(quantkit.load(out, dtype=torch.float32))

        # Score in chunks and rewrite the table after each, so a stopped run still leaves its figures.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # The base is scored as a model too: its ppl on the same windows is the reference for the rows'.
        parts: list[list[Quality]] = []
        for start in range(0, len(windows), args.chunk):
            parts.append(evaluate([base, *models], windows[start:start + args.chunk], base=base))
            done = min(start + args.chunk, len(windows))
            base_q = merge([p[0] for p in parts])
            for i, r in enumerate(results):
                r["quality"] = merge([p[i + 1] for p in parts])
            args.out.write_text(table(results, base_q, done, time.perf_counter() - t_start, len(windows)))
            log.info("windows %d/%d (%.0f s): %s", done, len(windows), time.perf_counter() - t_start,
                     ", ".join(f"{r['name']} ppl {r['quality'].ppl:.3f}" for r in results))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
