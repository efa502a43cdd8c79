"""The Markdown of `benchmarks/w8a8.py` (not a test): its table, the KV-cache table, and the peers' figures that are
comparable only under their protocol. Split out of w8a8.py unchanged."""

from __future__ import annotations

import argparse
import platform
from typing import Any

LLMC_ROWS = {"llmc-w8a8": "llm-compressor SmoothQuant(0.8)+GPTQ W8A8",
             "llmc-w8a8-sqfix": "llm-compressor SmoothQuant(0.8, Gemma mappings)+GPTQ W8A8",
             "llmc-w8a8-gptq": "llm-compressor GPTQ W8A8",
             "llmc-fp8dyn": "llm-compressor FP8_DYNAMIC"}
CONTEXT = 4096  # the KV table's memory: stored weights + KV cache at this many tokens (batch 1)
# llm-compressor 0.14.0.1 and bitsandbytes, measured by the peers' run (/work/shared/peers/results.md), not here
PEERS = [
    {"row": "llmc SmoothQuant(0.8)+GPTQ W8A8", "library": "llm-compressor 0.14.0.1 (peers)", "quant_s": 196.2,
     "peak_rss_mib": 2237, "size_bytes": 223.8e6, "ppl": 15.055, "kl": 0.0147, "top1": 93.89},
    {"row": "llmc FP8_DYNAMIC", "library": "llm-compressor 0.14.0.1 (peers)", "quant_s": 0.4, "peak_rss_mib": 2089,
     "size_bytes": 223.8e6, "ppl": 15.182, "kl": 0.0267, "top1": 91.30},
    {"row": "bnb LLM.int8 (weights only)", "library": "bitsandbytes 0.50.2 (peers)", "quant_s": 5.7,
     "peak_rss_mib": 1034, "size_bytes": 223.8e6, "ppl": 15.020, "kl": 0.0180, "top1": 92.97},
]


def peers(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The peers' figures (/work/shared/peers) are comparable only under their protocol: SmolLM2, 40 test windows.
    A row measured in this run replaces the peers' figure of the same library."""
    if a.model != "smollm2-135m" or a.windows != 40:
        return []
    live = {p for p in a.peers.split(",") if p}
    return [p for p in PEERS if not (live and p["row"].startswith("llmc"))]


def markdown(rows: list[dict[str, Any]], base: dict[str, Any], a: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"# W8A8 and FP8 on {a.model}: {a.nsamples} x {a.seqlen} calibration tokens (wiki-vital, seed 0)",
        "",
        f"Eval: first {a.windows} non-overlapping 512-token windows of wiki-vital's test text; KL(base || model) over "
        f"the full vocabulary; fp32, {a.threads} threads, {platform.machine()} CPU; activations quantized as each "
        f"checkpoint says (exact maths, dense kernel). "
        + ("Speed: not measured (--no-speed). " if a.no_speed else
           f"Speed: `kernel=auto` (the kernels column), prefill = one forward "
           f"over {a.prefill_batch} x {a.prefill_len} tokens, decode = greedy generation of {a.decode_tokens} tokens "
           f"after a 64-token prompt, batch 1; median of {a.repeats} interleaved repeats; x base = ratio to the fp32 "
           f"base in the same process. ")
        + (f"Rows assembled with --reuse from checkpoints, figures and scores kept in {a.keep} (quantized and scored "
           f"by earlier or parallel invocations, one thread each) " if a.reuse else
           f"All rows ran in one `benchmarks/w8a8.py` run (total {seconds / 60:.1f} min) ")
        + "on a shared 2-core machine: compare times as ratios (CPU seconds where the machine was loaded). "
        + ("Rows marked (peers) are the peers' figures (/work/shared/peers/results.md), not re-measured here. "
           if peers(a) else "")
        + ("llm-compressor rows: quantized by llm-compressor in .venv-llmc on the same calibration windows, scored "
           "by the same evaluator." if a.peers else ""),
        "",
        f"Command: `.venv/bin/python benchmarks/w8a8.py --model {a.model} --rows {a.rows} "
        + (f"--peers {a.peers} " if a.peers else "")
        + f"--nsamples {a.nsamples} --windows {a.windows} --threads {a.threads}{' --no-speed' if a.no_speed else ''}"
        + (f" --speed-rows {a.speed_rows} --repeats {a.repeats}" if a.speed_rows and not a.no_speed else "") + "`",
        "",
        "| row | library | quant s | quant CPU s | peak RSS MiB | ckpt MB | ppl | KL | top-1 % | kernels "
        "| prefill tok/s (x base) | decode tok/s (x base) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        f"| fp32 base | - | - | - | - | - | {base['ppl']:.3f} | 0 | 100.00 | fp32 | "
        + (f"{base['prefill_tps']:.0f} | {base['decode_tps']:.1f} |" if base.get("prefill_tps") else "- | - |"),
    ]
    for r in rows:
        speed = (f"{r['kernels']} | {r['prefill_tps']:.0f} ({r['prefill_tps'] / base['prefill_tps']:.2f}x) | "
                 f"{r['decode_tps']:.1f} ({r['decode_tps'] / base['decode_tps']:.2f}x)") if "kernels" in r else "- | - | -"
        cpu = f"{r['cpu_s']:.0f}" if "cpu_s" in r else "-"
        lines.append(f"| {LLMC_ROWS.get(r['row'], r['row'])} | {r['library']} | {r['quant_s']:.1f} | {cpu} | {r['peak_rss_mib']:.0f} | "
                     f"{r['size_bytes'] / 1e6:.1f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.2f} | {speed} |")
    kv_rows = [r for r in rows if r.get("kv_bytes_per_token") and r["row"].endswith("-kv")]
    if kv_rows:
        lines += ["", f"## KV cache: fp16 against FP8 on the same weights", "",
                  f"Each `ROW-kv` checkpoint is `ROW` with `--kv-cache fp8` (its weight tensors byte-identical to "
                  f"`ROW`'s, checked), scored with keys (after RoPE) and values fake-quantized to FP8 e4m3 with their "
                  f"per-layer scales; `ROW` is scored with a float cache (fp16 in an engine). KV bytes/token = layers x "
                  f"KV heads x head dim x 2 x bytes; memory at {CONTEXT} = stored weights + KV cache at {CONTEXT} "
                  f"tokens, batch 1.", "",
                  f"| checkpoint | cache | KV bytes/token | cache at {CONTEXT} MB | weights + cache MB | ppl | KL "
                  f"| KL cost of the cache |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        by_name = {r["row"]: r for r in rows}
        for r in kv_rows:
            plain = by_name.get(r["row"].removesuffix("-kv"))
            for x, cache in ((plain, "fp16"), (r, "fp8")):
                if x is None:
                    continue
                cost = f"{r['kl'] - plain['kl']:+.4f}" if plain is not None and cache == "fp8" else "-"
                same = "" if cache == "fp16" or x.get("same_weights") is None else \
                    ("" if x["same_weights"] else " (weights differ!)")
                lines.append(f"| {r['row'].removesuffix('-kv')}{same} | {cache} | {x['kv_bytes_per_token']} | "
                             f"{x['kv_bytes_per_token'] * CONTEXT / 1e6:.1f} | {x['context_bytes'] / 1e6:.1f} | "
                             f"{x['ppl']:.3f} | {x['kl']:.4f} | {cost} |")
    return "\n".join(lines) + "\n"
