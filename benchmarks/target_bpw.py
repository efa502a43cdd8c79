"""Per-layer bit allocation benchmark (not a test): GPTQ on one grid against `--target-bpw` at the same stored bits.

Protocol: the fixed one of benchmarks/quality.py (64 calibration windows x 512 tokens of wiki-vital, seed 0; the
first 40 non-overlapping 512-token test windows, KL(base || model) over the full vocabulary, top-1, ppl; fp32).
Each quantization runs in its own subprocess; each checkpoint is scored by quality.py's own scoring child.

Rows (B: the stored bits per weight of w4g64 on every Linear, computed from the shapes before any run):
  uniform-w4g64          GPTQ w4g64 on every Linear (stores B bits per weight)
  target-B               --target-bpw B, the default grids (4- and 8-bit, per channel or g128/g64/g32: gptq_marlin's bits)
  target-B-grouped       --target-bpw B, groups only (no per-channel grid)
  target-B-w3            --target-bpw B, 3-bit grids allowed as well (w3g128, w3g64, w3g32)
  target-B-grouped-fisher, target-B-w3-fisher
                         the same with --target-sensitivity fisher (errors weighed by their cost at the output)
  uniform-w4g32          GPTQ w4g32 on every Linear: the uniform grid next up in size
  target-high            --target-bpw HIGH (default 5.0)

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/target_bpw.py [--high 5.0] [--rows uniform-w4g64,...]

Quality numbers do not depend on the machine's load, so the rows may run in parallel processes (`--rows` each,
`--tag` to keep their records apart) and be put in one table with `--merge TAG,TAG`.
Appends to benchmarks/results/target_bpw.jsonl and writes benchmarks/results/target_bpw.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _proc import cpu_s, peak_mib  # benchmarks/_proc.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUALITY = ROOT / "benchmarks" / "quality.py"
GRIDS_48 = "w4,w4g128,w4g64,w4g32,w8,w8g128,w8g64,w8g32"
GRIDS_GROUPED = "w4g128,w4g64,w4g32,w8g128,w8g64,w8g32"
GRIDS_348 = "w3g128,w3g64,w3g32," + GRIDS_48
log = logging.getLogger("bench.target_bpw")


def child_quantize(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    from quantkit.api import quantize
    from quantkit.formats.stats import checkpoint_stats

    spec = json.loads(a.child)
    t0 = time.perf_counter()
    summary = quantize(a.model, "gptq", a.child_out, scheme=spec["scheme"], device="cpu",
                       calib={"dataset": "wiki-vital", "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": 0},
                       target_bpw=spec.get("target_bpw"), target_grids=spec.get("grids"),
                       target_sensitivity=spec.get("sensitivity"))
    stats = checkpoint_stats(a.child_out)
    return {"quant_s": summary["quantize_seconds"], "process_s": time.perf_counter() - t0, "cpu_s": cpu_s(),
            "peak_rss_mib": peak_mib(), "size_bytes": summary["size_bytes"], "bpw": stats["bits_per_weight"],
            "bpw_all": stats["bits_per_weight_all"], "allocation": summary.get("allocation")}


def run(cmd: list[str]) -> dict[str, Any]:
    log.info("running %s", " ".join(cmd))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd[2:6])} failed with exit code {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]], base_ppl: float, a: argparse.Namespace, seconds: float) -> str:
    proto = "".join(f" --{k} {v:g}" for k, v, d in (("nsamples", a.nsamples, 64), ("windows", a.windows, 40),
                                                     ("high", a.high, 5.0)) if v != d)
    lines = [
        f"# Per-layer bit allocation (`--target-bpw`) on {a.model}: GPTQ, {a.nsamples} x {a.seqlen} calibration "
        "tokens (wiki-vital, seed 0)",
        "",
        f"Eval: first {a.windows} non-overlapping 512-token windows of wiki-vital's test text; KL(base || model) over "
        f"the full vocabulary; fp32, {a.threads} thread(s), {platform.machine()} CPU, scored by benchmarks/quality.py's "
        f"scoring child. " + (f"Rows from the parallel runs tagged {a.merge} (the longest {seconds / 60:.1f} min): "
        "compare quality, not times" if a.merge else f"All rows ran in one run (total {seconds / 60:.1f} min)") + ". bits/w: stored bits of the quantized "
        "Linears (codes, scales, zeros, g_idx) per weight, as `quantkit.formats.stats` counts them; all: every tensor "
        "per parameter.",
        "",
        "Command: " + ("; ".join(f"`OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/target_bpw.py{proto} "
                                 f"--tag {t} --rows ...`" for t in a.merge.split(","))
                       + f", then `benchmarks/target_bpw.py{proto} --merge {a.merge}`" if a.merge else
                       f"`OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/target_bpw.py{proto}"
                       + (f" --rows {a.rows}" if a.rows else "") + "`"),
        "",
        "| row | grids | quant s | peak RSS MiB | ckpt MB | bits/w (Linears / all) | mix | ppl | KL | top-1 % |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
        f"| fp32 base | - | - | - | - | - | - | {base_ppl:.3f} | 0 | 100.00 |",
    ]
    for r in rows:
        alloc = r.get("allocation") or {}
        mix = ", ".join(f"{g} {n}" for g, n in sorted((alloc.get("mix") or {}).items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"| {r['row']} | {r.get('grids') or '-'} | {r['quant_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['size_bytes'] / 1e6:.1f} | {r['bpw']:.4f} / {r['bpw_all']:.3f} | {mix} | {r['ppl']:.3f} | "
                     f"{r['kl']:.4f} | {r['top1']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--high", type=float, default=5.0)
    ap.add_argument("--rows", default="", help="comma list of row names to run (default: all)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="a parallel part: record its rows under this tag, write no table")
    ap.add_argument("--skip-base", action="store_true", help="a parallel part that leaves the base's ppl to another")
    ap.add_argument("--merge", default="", help="comma list of tags: one table from their records")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.child:
        print(json.dumps(child_quantize(a)))
        return
    common = ["--model", a.model, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
              "--windows", str(a.windows), "--threads", str(a.threads)]
    if a.merge:
        return merge(a)
    b = uniform_bpw(a.model, 4, 64)
    plan = {"uniform-w4g64": {"scheme": {"bits": 4, "group_size": 64}},
            "target-B": {"scheme": {"bits": 4, "group_size": 64}, "target_bpw": b, "grids": GRIDS_48},
            "target-B-grouped": {"scheme": {"bits": 4, "group_size": 64}, "target_bpw": b, "grids": GRIDS_GROUPED},
            "target-B-w3": {"scheme": {"bits": 4, "group_size": 64}, "target_bpw": b, "grids": GRIDS_348},
            "target-B-grouped-fisher": {"scheme": {"bits": 4, "group_size": 64}, "target_bpw": b,
                                        "grids": GRIDS_GROUPED, "sensitivity": "fisher"},
            "target-B-w3-fisher": {"scheme": {"bits": 4, "group_size": 64}, "target_bpw": b, "grids": GRIDS_348,
                                   "sensitivity": "fisher"},
            "uniform-w4g32": {"scheme": {"bits": 4, "group_size": 32}},
            "target-high-grouped": {"scheme": {"bits": 4, "group_size": 64}, "target_bpw": a.high,
                                    "grids": GRIDS_GROUPED},
            "target-high": {"scheme": {"bits": 4, "group_size": 64}, "target_bpw": a.high, "grids": GRIDS_48}}
    names = a.rows.split(",") if a.rows else list(plan)
    unknown = [n for n in names if n not in plan]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(plan)}")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quantkit-bench-tbpw-") as tmp:
        for name in names:
            spec = plan[name]
            out = str(Path(tmp) / name)
            r = run([sys.executable, __file__, "--child", json.dumps(spec), "--child-out", out, *common])
            r.update(run([sys.executable, str(QUALITY), "--child", name, "--child-kind", "score",
                          "--child-out", out, *common])[out])
            label = name.replace("-B", f"-{b:.4f}").replace("-high", f"-{a.high:g}")
            r.update(row=label, grids=spec.get("grids"), target_bpw=spec.get("target_bpw"))
            rows.append(r)
            log.info("%s: %s", label, {k: v for k, v in r.items() if k != "allocation"})
        base = {"base": {"ppl": None}} if a.skip_base else run(
            [sys.executable, str(QUALITY), "--child", "base", "--child-kind", "score", "--child-out", "-", *common])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    seconds = time.perf_counter() - t0
    with (RESULTS / "target_bpw.jsonl").open("a") as fh:
        for r in rows:
            fh.write(json.dumps({"when": stamp, "model": a.model, "threads": a.threads, "tag": a.tag,
                                 "base_ppl": base["base"]["ppl"], "run_s": seconds, **r}) + "\n")
    if not a.tag:
        write_table(rows, base["base"]["ppl"], a, seconds)


def uniform_bpw(model: str, bits: int, group_size: int) -> float:
    """Stored bits per weight of every quantized Linear on one grid (what checkpoint_stats reports for it)."""
    import torch
    from quantkit.budget.run import quantized_linears
    from quantkit.budget.sensitivity import stored_bits
    from quantkit.models.sources import load_model, resolve
    from quantkit.scheme import ModuleGrid, make_scheme

    m, _ = load_model(resolve(model), torch.float32)
    lins = quantized_linears(m, make_scheme(None, bits=bits, group_size=group_size))
    grid = ModuleGrid(bits=bits, group_size=group_size)
    bits_total = sum(stored_bits(x.out_features, x.in_features, grid) for x in lins.values())
    return bits_total / sum(x.out_features * x.in_features for x in lins.values())


def write_table(rows: list[dict[str, Any]], base_ppl: float, a: argparse.Namespace, seconds: float) -> None:
    text = markdown(rows, base_ppl, a, seconds)
    (RESULTS / "target_bpw.md").write_text(text)
    print(text)


def merge(a: argparse.Namespace) -> None:
    """One table from the latest records of the tagged parallel runs (`--merge TAG,TAG`)."""
    tags = a.merge.split(",")
    recs = [json.loads(line) for line in (RESULTS / "target_bpw.jsonl").read_text().splitlines() if line.strip()]
    rows: dict[str, dict[str, Any]] = {}
    for r in recs:
        if r.get("tag") in tags and r.get("model") == a.model:
            rows[r["row"]] = r  # later records win
    order = ["uniform-w4g64", "target-", "uniform-w4g32"]
    ranked = sorted(rows.values(), key=lambda r: (next(k for k, p in enumerate(order) if r["row"].startswith(p)),
                                                  r.get("target_bpw") or 0, r["row"]))
    a.rows = ",".join(r["row"] for r in ranked)
    base_ppl = next(r["base_ppl"] for r in ranked if r.get("base_ppl") is not None)
    write_table(ranked, base_ppl, a, max(r["run_s"] for r in ranked))

if __name__ == "__main__":
    main()
