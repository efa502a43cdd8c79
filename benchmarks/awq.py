"""Benchmark: AWQ w4g64 vs RTN w4g64 on smollm2-135m under the peers' protocol.

Each quantization runs in its own subprocess (time and peak RSS are that process's):
64 calibration windows x 512 tokens of wiki-vital drawn with seed 0
(`quantkit.calib.data.calibration_samples`). The checkpoints are reloaded with
`quantkit.load` and scored on the first 40 non-overlapping 512-token windows of the
test text against the fp32 base (ppl, KL(base || model), top-1). GPTQModel's AWQ is
not run (3+ hours on this CPU); the peers' figures are printed for reference.
The table goes to benchmarks/results/awq.md.

    .venv/bin/python benchmarks/awq.py
    .venv/bin/python benchmarks/awq.py --rows awq --nsamples 16 --windows 8   # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("benchmarks.awq")

MODEL = "smollm2-135m"
PEERS_FILE = Path("/work/shared/peers/results.md")
PEER_ROWS = ("fp32_base", "rtn_w4g64", "bnb_nf4_dq", "gptqmodel_gptq_w4g64", "llmc_gptq_w4g64",
             "gptqmodel_awq_w4g64_bfloat16", "llmc_awq_w4g64")
ROWS: dict[str, tuple[str, dict[str, Any]]] = {"rtn": ("rtn", {}), "awq": ("awq", {})}


def child(method: str, out: Path, nsamples: int, seqlen: int, threads: int) -> None:
    """One quantization in this process; prints a JSON line with its figures."""
    t_proc = time.perf_counter()
    torch.set_num_threads(threads)
    import quantkit

    summary = quantkit.quantize(MODEL, ROWS[method][0], out, scheme="w4g64", options=ROWS[method][1], device="cpu",
                                calib={"dataset": "wiki-vital", "nsamples": nsamples, "seqlen": seqlen, "seed": 0},
                                progress=lambda stage, done, total: log.info("%s %d/%d %.0f s", stage, done, total,
                                                                             time.perf_counter() - t_proc))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"quant_s": summary["quantize_seconds"], "process_s": time.perf_counter() - t_proc,
                      "cpu_s": usage.ru_utime + usage.ru_stime,  # on a shared machine: divide by threads
                      "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB -> MiB on Linux
                      "size_bytes": summary["size_bytes"]}))


def run_child(method: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", method, "--child-out", str(out), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--threads", str(args.threads)]
    log.info("running %s", " ".join(cmd))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # its log goes to our stderr
    if res.returncode:
        raise SystemExit(f"{method} failed with exit code {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def peer_lines() -> list[str]:
    if not PEERS_FILE.is_file():
        return ["(peer figures not found)"]
    lines = PEERS_FILE.read_text().splitlines()
    head = [ln for ln in lines if ln.startswith("| setting") or ln.startswith("|---")][:2]
    return head + [ln for ln in lines if any(ln.startswith(f"| {r} |") for r in PEER_ROWS)]


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"# AWQ on {MODEL}: w4g64, {args.nsamples} x {args.seqlen} calibration tokens (wiki-vital, seed 0)",
        "",
        f"Eval: first {args.windows} non-overlapping 512-token windows of wiki-vital's test text, each on its own; "
        "KL(base || model) over the full vocabulary and top-1 agreement against the fp32 base; checkpoints "
        f"reloaded with `quantkit.load` (fp32 compute). torch {torch.__version__}, {args.threads} threads, "
        f"{platform.machine()} CPU shared with other jobs: wall seconds are noisy; process CPU s / {args.threads} "
        "estimates the wall time on an idle machine.",
        "",
        f"Produced by `.venv/bin/python benchmarks/awq.py` (total {seconds / 60:.1f} min).",
        "",
        "| row | quant s | process s | process CPU s | peak RSS MiB | ckpt MB | ppl | KL | top-1 % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 base | - | - | - | - | - | {results['base']['ppl']:.3f} | 0 | 100.00 |",
    ]
    for name, r in results.items():
        if name == "base":
            continue
        lines.append(f"| {name} w4g64 | {r['quant_s']:.1f} | {r['process_s']:.1f} | {r.get('cpu_s', float('nan')):.0f} "
                     f"| {r['peak_rss_mib']:.0f} "
                     f"| {r['size_bytes'] / 1e6:.1f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.2f} |")
    if "awq" in results and "rtn" in results:
        a, r = results["awq"], results["rtn"]
        lines += ["", f"AWQ / RTN: time x{a['quant_s'] / max(r['quant_s'], 1e-9):.0f}, "
                      f"KL x{a['kl'] / r['kl']:.3f}, ppl {a['ppl'] - r['ppl']:+.3f}."]
    lines += ["", "## Peer figures (measured separately on this machine: /work/shared/peers/results.md)", ""]
    lines += peer_lines()
    lines += ["", "GPTQModel's AWQ (about 11 min per layer here, 3 h 20 min projected) and llm-compressor's AWQ "
                  "(about 2.5 min per layer, 75 min projected) were stopped by hand by the peers: no quality figure.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="rtn,awq", help=f"comma list of: {', '.join(ROWS)}")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "awq.md")
    parser.add_argument("--child", choices=sorted(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        child(args.child, args.child_out, args.nsamples, args.seqlen, args.threads)
        return

    import quantkit
    from quantkit.calib.data import test_windows
    from quantkit.eval.quality import evaluate
    from quantkit.models.sources import load_model, resolve

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="quantkit-bench-awq-") as tmp:
        names = args.rows.split(",")
        for name in names:
            results[name] = run_child(name, Path(tmp) / name, args)
            log.info("%s: %s", name, results[name])
        base, tok = load_model(resolve(MODEL), torch.float32)
        windows = test_windows(tok, seqlen=512, max_windows=args.windows)
        models = [quantkit.load(Path(tmp) / n, dtype=torch.float32) for n in names]
        qualities = evaluate([base, *models], windows, base=base)
    results = {"base": {"ppl": qualities[0].ppl}, **results}
    for name, q in zip(names, qualities[1:]):
        results[name].update(ppl=q.ppl, kl=q.kl, top1=q.top1)
        log.info("%s: ppl %.3f KL %.4f top-1 %.2f", name, q.ppl, q.kl, q.top1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = table(results, args, time.perf_counter() - t_start)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
