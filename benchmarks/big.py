"""Big-run benchmark (not a test): memory plan vs measured peak RSS, a >= 2 GB model with --offload disk,
and the cost of the resume bookkeeping. Writes a markdown report (default benchmarks/results/big.md).

1. Plan vs measured: each quantization runs in its own subprocess; `plan` is the memory plan that
   `quantkit.api.quantize` computed at the start of that same process, `measured` its peak RSS
   (VmHWM; ru_maxrss would inherit the parent's peak through exec).
   Models: smollm2-135m (wiki-vital) and tiny random Llamas (hidden 256) of 4, 16 and 64 layers.
2. Big model: a random Llama built from a config (hidden 2048, 24 layers, bf16 on disk: 2.7 GB) and
   written shard by shard (one tensor in memory at a time), quantized with GPTQ --offload disk.
3. Resume bookkeeping: the run's own timer (hashing the model, writing finished blocks and
   activations, reading them back at the save) against its total, and the same run without a
   work folder (the finished blocks' codes held in memory, as before per-block resume).

    .venv/bin/python benchmarks/big.py                 # the full benchmark (hours on 2 cores)
    .venv/bin/python benchmarks/big.py --quick --out /tmp/big.md   # minutes: small settings, small models
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import peak_mib  # benchmarks/_proc.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny builds the random models
log = logging.getLogger("bench.big")
MiB = 2**20


# ----------------------------------------------------------------------------------------- children
def child_quantize(a: argparse.Namespace) -> dict:
    """One quantization; with --no-work the old path (codes in memory, no work folder) for comparison."""
    from quantkit.api import make_job, quantize
    from quantkit.paths import atomic_dir

    calib = {"dataset": a.dataset, "nsamples": a.nsamples, "seqlen": a.seqlen, "batch_size": a.batch_size}
    opts = {"offload": "disk"} if a.offload else {}
    t0 = time.perf_counter()
    if a.no_work:
        impl, job = make_job(a.model, a.method, scheme=a.preset, calib=calib, options=opts, device="cpu")
        artifact = impl.quantize(job)
        with atomic_dir(Path(a.out), force=True) as tmp:
            artifact.save(tmp)
        return {"seconds": time.perf_counter() - t0, "peak_mib": peak_mib()}
    s = quantize(a.model, a.method, a.out, scheme=a.preset, calib=calib, options=opts, device="cpu", force=True)
    return {"seconds": time.perf_counter() - t0, "quant_s": s["quantize_seconds"], "peak_mib": peak_mib(),
            "plan_mib": (s["memory_plan_peak_bytes"] or 0) / MiB, "bookkeeping_s": s["resume"]["bookkeeping_seconds"],
            "files": s["files"]}


def child_main(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    Path(a.result).write_text(json.dumps(child_quantize(a)))


# ------------------------------------------------------------------------------------------- models
def build_random_llama(folder: Path, hidden: int, layers: int, inter: int, vocab: int, dtype: str) -> int:
    """A random Llama written shard by shard (normal(0, 0.02) weights, unit norms); returns its bytes on disk."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from quantkit.formats.shards import Entry, natural_key, write_shards
    from tests.tiny import tiny_tokenizer

    if (folder / "config.json").is_file():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    folder.mkdir(parents=True)
    dt = getattr(torch, dtype)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=4096, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                         dtype=dtype)
    from accelerate import init_empty_weights

    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}

    def make(name: str, shape: tuple[int, ...], seed: int):
        def load():
            if name.endswith("norm.weight"):
                return torch.ones(shape, dtype=dt)
            g = torch.Generator().manual_seed(seed)
            return torch.randn(shape, generator=g).mul_(0.02).to(dt)
        return load

    entries = [Entry(n, dt, s, make(n, s, k)) for k, (n, s) in enumerate(sorted(shapes.items(),
                                                                           key=lambda x: natural_key(x[0])))]
    write_shards(folder, entries, max_shard_size=10**9)
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------- parent
def _spawn(args: list[str], tmp: Path, name: str, threads: int) -> dict | None:
    result, logf = tmp / f"{name}.json", tmp / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args, "--result", str(result),
           "--threads", str(threads)]
    log.info("running %s (log: %s)", name, logf)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    with open(logf, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0 or not result.is_file():
        log.error("%s failed (exit %d); last lines:\n%s", name, rc, "\n".join(logf.read_text().splitlines()[-15:]))
        return None
    return json.loads(result.read_text())


def _run(a, tmp: Path, name: str, model: Path | str, method: str, dataset: str, nsamples: int, seqlen: int,
         offload: bool = False, no_work: bool = False, preset: str = "w4g64") -> dict:
    args = ["--model", str(model), "--method", method, "--dataset", dataset, "--nsamples", str(nsamples),
            "--seqlen", str(seqlen), "--batch-size", str(a.batch_size), "--preset", preset,
            "--out", str(tmp / f"q-{name}")]
    args += ["--offload"] if offload else []
    args += ["--no-work"] if no_work else []
    res = _spawn(args, tmp, name, a.threads)
    row = {"name": name, "model": str(model), "method": method, "offload": offload, "calib": f"{nsamples} x {seqlen}"}
    return {**row, **(res or {"failed": True})}


def plan_rows(a, tmp: Path, text: Path) -> list[dict]:
    from tests.tiny import llama_config, make_model

    rows = []
    for method in a.methods:
        if a.smollm2:
            rows.append(_run(a, tmp, f"smollm2-{method}", "smollm2-135m", method, "wiki-vital", a.nsamples, a.seqlen))
        for layers in a.depths:
            folder = tmp / f"llama{layers}"
            if not (folder / "config.json").is_file():
                make_model(folder, llama_config(layers=layers, hidden=256, inter=768))
            for offload in (False, True):
                rows.append(_run(a, tmp, f"llama{layers}-{method}-{'disk' if offload else 'mem'}", folder, method,
                                 str(text), a.tiny_nsamples, a.tiny_seqlen, offload))
    return rows


def big_rows(a, tmp: Path, text: Path) -> tuple[list[dict], float]:
    folder = Path(a.big_dir) if a.big_dir else tmp / "big"
    size = build_random_llama(folder, a.big_hidden, a.big_layers, a.big_inter, 32000, "bfloat16")
    row = _run(a, tmp, "big-gptq-disk", folder, "gptq", str(text), a.big_nsamples, a.big_seqlen, offload=True)
    rows = [row]
    if a.big_compare:  # the same run without a work folder: the bookkeeping's cost in wall time
        rows.append(_run(a, tmp, "big-gptq-disk-nowork", folder, "gptq", str(text), a.big_nsamples, a.big_seqlen,
                         offload=True, no_work=True))
    return rows, size


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(a, plan: list[dict], big: list[dict], big_size: float, overhead: list[dict]) -> str:
    lines = ["# Big runs: memory plan, --offload disk on a 2+ GB model, resume bookkeeping", "",
             f"`.venv/bin/python benchmarks/big.py {' '.join(sys.argv[1:])}`; CPU, {a.threads} threads, w4g64. "
             "Each row is its own process: `measured` is its peak RSS (VmHWM), `plan` the memory plan `quantize` computed at "
             "its start (config.json and safetensors headers only).", "",
             "## Plan vs measured peak RSS", "",
             "| model | method | offload | calibration | plan MiB | measured MiB | plan / measured | s |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in plan:
        if r.get("failed"):
            lines.append(f"| {r['name']} | {r['method']} | {r['offload']} | {r['calib']} | FAILED (see log) ||||")
            continue
        lines.append(f"| {r['name']} | {r['method']} | {'disk' if r['offload'] else 'none'} | {r['calib']} | "
                     f"{r['plan_mib']:.0f} | {r['peak_mib']:.0f} | {r['plan_mib'] / r['peak_mib']:.2f} | "
                     f"{r['seconds']:.0f} |")
    if big:
        lines += ["", f"## A {big_size / 1e9:.2f} GB model (random Llama, hidden {a.big_hidden}, {a.big_layers} "
                  f"layers, bf16 on disk), GPTQ --offload disk", "",
                  "| run | calibration | s | peak RSS MiB | plan MiB | bookkeeping s | output files |",
                  "|---|---|---:|---:|---:|---:|---|"]
    for r in big:
        if r.get("failed"):
            lines.append(f"| {r['name']} | {r['calib']} | FAILED (see log) |||||")
            continue
        files = ", ".join(f for f in r.get("files", []) if f.endswith(".safetensors") or f.endswith(".json"))
        lines.append(f"| {r['name']} | {r['calib']} | {r['seconds']:.0f} | {r['peak_mib']:.0f} | "
                     f"{_f(r.get('plan_mib'), '.0f')} | {_f(r.get('bookkeeping_s'), '.1f')} | {files or '-'} |")
    lines += ["", "## Resume bookkeeping overhead", "",
              "`bookkeeping s`: hashing the model files, writing each finished block, its side results and the "
              "next block's inputs, reading the blocks back at the save (the run's own timer).", "",
              "| run | total s | bookkeeping s | share % |", "|---|---:|---:|---:|"]
    for r in overhead:
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | {r['bookkeeping_s']:.2f} | "
                     f"{100 * r['bookkeeping_s'] / r['seconds']:.1f} |")
    pair = {r["name"]: r for r in big if not r.get("failed")}
    if "big-gptq-disk" in pair and "big-gptq-disk-nowork" in pair:
        w, n = pair["big-gptq-disk"], pair["big-gptq-disk-nowork"]
        lines += ["", f"Same big run without a work folder: {n['seconds']:.0f} s, peak RSS {n['peak_mib']:.0f} MiB "
                      f"(with: {w['seconds']:.0f} s, {w['peak_mib']:.0f} MiB)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small settings and models: checks the script in minutes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "big.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["gptq", "awq"])
    ap.add_argument("--nsamples", type=int, default=64), ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tiny-nsamples", type=int, default=32), ap.add_argument("--tiny-seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64])
    ap.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--big-compare", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--big-hidden", type=int, default=2048), ap.add_argument("--big-inter", type=int, default=5504)
    ap.add_argument("--big-layers", type=int, default=24)
    ap.add_argument("--big-nsamples", type=int, default=16), ap.add_argument("--big-seqlen", type=int, default=512)
    ap.add_argument("--big-dir", help="keep (and reuse) the big random model in this folder")
    # child-process arguments
    ap.add_argument("--child", action="store_true"), ap.add_argument("--result")
    ap.add_argument("--model"), ap.add_argument("--method"), ap.add_argument("--dataset"), ap.add_argument("--preset")
    ap.add_argument("--offload", action="store_true"), ap.add_argument("--no-work", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.child:
        child_main(a)
        return
    if a.quick:  # the same code paths on small settings
        a.nsamples, a.seqlen, a.tiny_nsamples, a.tiny_seqlen, a.depths = 8, 128, 8, 128, [4, 16]
        a.big_hidden, a.big_inter, a.big_layers, a.big_nsamples, a.big_seqlen = 512, 1408, 4, 4, 128
        a.methods = ["gptq"]
    from tests.tiny import write_text

    with tempfile.TemporaryDirectory(prefix="quantkit-bench-big-") as t:
        tmp = Path(t)
        text = write_text(tmp / "calib.txt")
        plan = plan_rows(a, tmp, text)
        big, size = big_rows(a, tmp, text) if a.big else ([], 0.0)
        overhead = [r for r in plan + big if not r.get("failed") and r.get("bookkeeping_s") is not None]
        md = markdown(a, plan, big, size, overhead)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
