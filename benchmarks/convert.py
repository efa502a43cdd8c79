"""Benchmark: `quantkit convert` time, peak RSS and throughput against a plain file copy.

Models: smollm2-135m, and a random Llama of >= 2 GB on disk made locally (fp16, written
tensor by tensor into a temporary folder under /tmp and deleted afterwards) with a random
GPTQ w4g128 checkpoint of the same config (random codes, fp16 scales).
Conversions: HF -> GGUF q8_0, GPTQ -> AWQ, GPTQ -> compressed-tensors.

Each conversion runs in its own subprocess: peak RSS is sampled every 2 ms during the conversion
and reported above the RSS right after imports (the interpreter's baseline). Throughput is input bytes
per second; "copy" is shutil.copyfile of the same input weights.
The table goes to benchmarks/results/convert.md.

    flock /tmp/quantkit-heavy.lock .venv/bin/python benchmarks/convert.py
    .venv/bin/python benchmarks/convert.py --models smollm2     # the small one only
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("benchmarks.convert")
RESULTS = Path(__file__).parent / "results" / "convert.md"
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048)


def child(src: str, to: str, out: str, gguf_type: str) -> None:
    """Run one conversion; print JSON {seconds, baseline_rss, peak_rss} (bytes).

    The peak is sampled every 2 ms by a thread during the conversion only: ru_maxrss would also
    count transient peaks of the imports, which happen before the baseline is taken.
    """
    import threading

    import psutil

    import transformers  # noqa: F401  - the libraries a conversion uses count as the baseline, not its data
    from transformers import AutoModelForCausalLM  # noqa: F401

    import quantkit.convert.folder  # noqa: F401
    import quantkit.convert.gguf_export  # noqa: F401
    from quantkit.convert import convert

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    convert(src, to, out, gguf_type=gguf_type)
    dt = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(json.dumps({"seconds": dt, "baseline_rss": base, "peak_rss": max(peak[0], proc.memory_info().rss)}))


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def copy_rate(folder: Path, tmp: Path) -> float:
    files = sorted(folder.glob("*.safetensors"))
    t0 = time.perf_counter()
    for f in files:
        shutil.copyfile(f, tmp / f"copy-{f.name}")
    dt = time.perf_counter() - t0
    for f in files:
        (tmp / f"copy-{f.name}").unlink()
    return weights_bytes(folder) / dt


def run_one(src: Path, to: str, out: Path, gguf_type: str = "q8_0") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(src), to, str(out), gguf_type]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def make_big(folder: Path, tokenizer_from: Path) -> tuple[Path, Path]:
    """A random fp16 Llama (>= 2 GB) and a random GPTQ w4g128 checkpoint of it, written tensor by tensor."""
    from transformers import LlamaConfig

    from quantkit.convert.stream import PlannedTensor, StreamingWriter
    from quantkit.formats.specs import get_format
    from quantkit.scheme import QuantScheme

    cfg = LlamaConfig(**BIG, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    linears = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    plain = {"model.embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
             "model.norm.weight": (h,)}
    for L in range(cfg.num_hidden_layers):
        plain[f"model.layers.{L}.input_layernorm.weight"] = (h,)
        plain[f"model.layers.{L}.post_attention_layernorm.weight"] = (h,)
    g = torch.Generator().manual_seed(0)
    scheme = QuantScheme(bits=4, group_size=128, sym=True)
    fp, gq = folder / "big-hf", folder / "big-gptq"
    for d in (fp, gq):
        d.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / f, d / f)
    # fp16 HF model
    names = dict(plain)
    for L in range(cfg.num_hidden_layers):
        for n, shape in linears.items():
            names[f"model.layers.{L}.{n}.weight"] = shape
    plan = [PlannedTensor(k, torch.float16, tuple(v)) for k, v in sorted(names.items())]
    with StreamingWriter(fp / "model.safetensors", plan) as w:
        for p in plan:
            t = torch.ones(p.shape) if len(p.shape) == 1 else torch.randn(p.shape, generator=g) * 0.02
            w.write(p.name, t.to(torch.float16))
    cfg_dict = cfg.to_dict()
    cfg_dict["dtype"] = "float16"
    (fp / "config.json").write_text(json.dumps(cfg_dict))
    # GPTQ v1 checkpoint of the same shapes: random codes, zero 8 (stored 7), fp16 scales
    gnames: dict[str, tuple[tuple[int, ...], torch.dtype]] = {k: (v, torch.float16) for k, v in plain.items()}
    for L in range(cfg.num_hidden_layers):
        for n, (o, k) in linears.items():
            base = f"model.layers.{L}.{n}"
            gnames[f"{base}.qweight"] = ((k // 8, o), torch.int32)
            gnames[f"{base}.qzeros"] = ((k // 128, o // 8), torch.int32)
            gnames[f"{base}.scales"] = ((k // 128, o), torch.float16)
            gnames[f"{base}.g_idx"] = ((k,), torch.int32)
    plan = [PlannedTensor(k, dt, tuple(s)) for k, (s, dt) in sorted(gnames.items())]
    with StreamingWriter(gq / "model.safetensors", plan) as w:
        for p in plan:
            leaf = p.name.rsplit(".", 1)[1]
            if leaf == "qweight":
                t = torch.randint(-2**31, 2**31 - 1, p.shape, generator=g, dtype=torch.int64).to(torch.int32)
            elif leaf == "qzeros":
                t = torch.full(p.shape, 0x77777777, dtype=torch.int32)
            elif leaf == "g_idx":
                t = (torch.arange(p.shape[0]) // 128).to(torch.int32)
            elif len(p.shape) == 1:
                t = torch.ones(p.shape, dtype=torch.float16)
            else:
                t = (torch.rand(p.shape, generator=g) * 0.01 + 1e-3 if leaf == "scales"
                     else torch.randn(p.shape, generator=g) * 0.02).to(torch.float16)
            w.write(p.name, t)
    cfg_dict["quantization_config"] = get_format("gptq").quantization_config(scheme, {})
    (gq / "config.json").write_text(json.dumps(cfg_dict))
    return fp, gq


def bench(name: str, fp: Path, gq: Path, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for label, src, to, out in (("HF -> GGUF q8_0", fp, "gguf", tmp / f"{name}.gguf"),
                                ("GPTQ -> AWQ", gq, "awq", tmp / f"{name}-awq"),
                                ("GPTQ -> compressed-tensors", gq, "compressed-tensors", tmp / f"{name}-ct")):
        size = weights_bytes(src)
        copy = copy_rate(src, tmp)
        r = run_one(src, to, out)
        rows.append({"model": name, "conversion": label, "input_bytes": size, **r,
                     "rate": size / r["seconds"], "copy_rate": copy})
        log.info("%s %s: %.1f s, peak RSS +%.0f MB", name, label, r["seconds"], (r["peak_rss"] - r["baseline_rss"]) / 2**20)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        for side in tmp.glob(f"{out.name}.*"):
            side.unlink()
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    mb = 2 ** 20
    lines = [
        "# quantkit convert: time, peak RSS, throughput",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, CPU shared with other jobs. "
        "Command: `flock /tmp/quantkit-heavy.lock .venv/bin/python benchmarks/convert.py`.",
        "Peak RSS: the conversion subprocess's RSS sampled every 2 ms during the conversion, minus its RSS after importing quantkit.convert, transformers and gguf (the interpreter baseline). "
        "Rates are input weight bytes per second; copy = shutil.copyfile of the same files just before.",
        "",
        "| model | conversion | input | time (s) | peak RSS above baseline | baseline RSS | rate | copy rate | rate / copy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['conversion']} | {r['input_bytes'] / mb:.0f} MB | {r['seconds']:.1f} | "
                     f"{(r['peak_rss'] - r['baseline_rss']) / mb:.0f} MB | {r['baseline_rss'] / mb:.0f} MB | "
                     f"{r['rate'] / mb:.0f} MB/s | {r['copy_rate'] / mb:.0f} MB/s | {r['rate'] / r['copy_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2", "big"], choices=["smollm2", "big"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from quantkit.api import quantize
    from quantkit.models.sources import resolve

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quantkit-convert-bench-", dir="/tmp") as d:
        tmp = Path(d)
        small = Path(resolve("smollm2-135m").path)
        if "smollm2" in args.models:
            gq = tmp / "smollm2-gptq"
            quantize("smollm2-135m", "rtn", gq, scheme="w4g64", device="cpu")
            rows += bench("smollm2-135m", small, gq, tmp)
            shutil.rmtree(gq)
        if "big" in args.models:
            fp, gq = make_big(tmp, small)
            log.info("random model: %.2f GB fp16, GPTQ %.2f GB", weights_bytes(fp) / 1e9, weights_bytes(gq) / 1e9)
            rows += bench(f"random Llama {weights_bytes(fp) / 1e9:.1f} GB", fp, gq, tmp)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
