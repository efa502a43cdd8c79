"""Quantized token embedding (benchmark, not a test): what `--embedding int8|int4` costs in KL and saves in size.

Each row is RTN on the w4g64 grid (asymmetric, quantkit's default, and symmetric), written as compressed-tensors
pack-quantized, with the token embedding (tied to lm_head on both models) kept float16, stored int8 (symmetric, one
scale per row) or int4 (the scheme's 64-wide groups and symmetry). RTN is data-free, so the rows differ only in the
embedding. Scoring is `quantkit eval`'s fixed protocol (`quantkit.eval.runner.evaluate_paths`): the first 40
non-overlapping 512-token windows of wiki-vital's test text, fp32, KL(base || model) over the full vocabulary,
top-1 agreement, ppl; the float model is the base. Size: the checkpoint folder (MB = 1e6 bytes), bits per weight
over the quantized Linears and over every stored weight (`quantkit.formats.stats.checkpoint_stats`).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/embedding.py --model smollm2-135m
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/embedding.py --model gemma3-270m --grids asym --windows 10

Each run appends its rows to benchmarks/results/embedding.jsonl; benchmarks/results/embedding.md is rebuilt from
the latest run of every model.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EMBEDDINGS = (None, "int8", "int4")
log = logging.getLogger("bench.embedding")


def run(model: str, grids: list[str], windows: int, threads: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(threads)
    from quantkit.api import quantize
    from quantkit.eval.runner import evaluate_paths
    from quantkit.formats.stats import checkpoint_stats

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qk-emb-") as tmp:
        outs = []
        for grid in grids:
            for emb in EMBEDDINGS:
                out = Path(tmp) / f"{grid}-{emb or 'fp16'}"
                scheme = {"bits": 4, "group_size": 64, "sym": grid == "sym", "embedding": emb}
                t0 = time.perf_counter()
                quantize(model, "rtn", out, scheme=scheme, device="cpu", fmt="compressed-tensors")
                stats = checkpoint_stats(out)
                rows.append({"model": model, "grid": f"w4g64 {grid}", "embedding": emb or "fp16",
                             "quantize_s": round(time.perf_counter() - t0, 2), "size_mb": stats["size_bytes"] / 1e6,
                             "bpw_linear": stats["bits_per_weight"], "bpw_all": stats["bits_per_weight_all"],
                             "bpw_embedding": stats["embedding_bits_per_weight"]})
                outs.append(str(out))
                log.info("%s: %.1f MB, %.3f bits/w over all weights", out.name, rows[-1]["size_mb"], rows[-1]["bpw_all"])
        t0 = time.perf_counter()
        result = evaluate_paths(outs, base=model, max_windows=windows, dtype="float32", cache=False, kernel="reference",
                                on_row=lambda r: log.info("%s: KL %s ppl %s top-1 %s", r["model"], r["kl"], r["ppl"],
                                                          r["top1"]))
        log.info("scored %d checkpoints in %.0f s", len(outs), time.perf_counter() - t0)
    scored = [r for r in result["rows"] if not r["is_base"]]
    base = next(r for r in result["rows"] if r["is_base"])
    for row, r in zip(rows, scored):
        if r.get("error"):
            raise SystemExit(f"{row['grid']} {row['embedding']}: {r['error']}")
        row.update(kl=r["kl"], ppl=r["ppl"], top1=r["top1"], base_ppl=base["ppl"], windows=windows)
    return rows


def markdown(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["# Quantized token embedding: KL cost and size", "",
             "RTN w4g64, compressed-tensors pack-quantized; the token embedding (tied lm_head) float16, int8 "
             "(symmetric, per row) or int4 (the scheme's g64 grid). `quantkit eval` protocol: first 40 "
             "non-overlapping 512-token windows of wiki-vital's test text, fp32, KL(base || model), top-1 vs the "
             "float model (fewer windows where a section says so). bits/w Linears: stored bits of the quantized Linears per weight; all: every stored "
             "bit per weight of the model (embedding, norms included). Made by `benchmarks/embedding.py` "
             "(see its docstring for the command); CPU, one thread.", ""]
    for model, rows in runs.items():
        r0 = rows[0]
        lines += [f"## {model}", "", f"{r0['windows']} test windows of 512 tokens; base ppl {r0['base_ppl']:.3f}; "
                  f"{r0.get('host', '')}, {r0.get('date', '')}.", "",
                  "| grid | embedding | KL | ppl | top-1 % | ckpt MB | bits/w Linears | bits/w all | bits/w embedding | KL vs fp16 emb |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ref = {r["grid"]: r["kl"] for r in rows if r["embedding"] == "fp16"}
        for r in rows:
            emb_bpw = f"{r['bpw_embedding']:.3f}" if r["bpw_embedding"] else "16"
            lines.append(f"| {r['grid']} | {r['embedding']} | {r['kl']:.4f} | {r['ppl']:.3f} | {r['top1']:.2f} | "
                         f"{r['size_mb']:.1f} | {r['bpw_linear']:.3f} | {r['bpw_all']:.3f} | {emb_bpw} | "
                         f"{r['kl'] / ref[r['grid']]:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--grids", default="asym,sym", help="comma list of asym, sym")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", action="store_true", help="only rebuild embedding.md from embedding.jsonl")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not a.render:
        rows = run(a.model, a.grids.split(","), a.windows, a.threads)
        stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "host": platform.processor() or platform.machine()}
        RESULTS.mkdir(parents=True, exist_ok=True)
        with (RESULTS / "embedding.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, **stamp}) + "\n")
    runs: dict[str, list[dict[str, Any]]] = {}
    for line in (RESULTS / "embedding.jsonl").read_text().splitlines():
        r = json.loads(line)
        latest = runs.setdefault(r["model"], [])
        if latest and latest[0]["date"] != r["date"]:
            latest.clear()
        latest.append(r)
    (RESULTS / "embedding.md").write_text(markdown(runs))
    log.info("wrote %s", RESULTS / "embedding.md")


if __name__ == "__main__":
    main()
