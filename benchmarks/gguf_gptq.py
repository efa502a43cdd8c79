"""GPTQ error feedback on the GGUF grid against quantkit's and llama.cpp's importance-weighted files, same size.

    PYTHONPATH=. python benchmarks/gguf_gptq.py [--types q4_k_m,q4_0] [--chunks 10] [--judge quantkit|llamacpp|both]

Per type, on the same text split as benchmarks/gguf_judge.py (calibration text = the 300,000 characters of
wiki-vital before the last 200,000, test text = the last 200,000):
- qk-TYPE: quantkit's mix, plain (llama-quantize's reference rounding, byte-identical to it);
- qk-TYPE-cal: llama.cpp's importance-weighted search fed by quantkit's statistics (64 windows of 512 tokens);
- qk-TYPE-gptq: `quantkit quantize --method gptq --format gguf --type TYPE`, calibrated on the calibration
  text (64 windows of 512 tokens, seed 0): GPTQ error feedback with each block's grid searched by the same
  weighted search on the error-updated weights;
- lc-TYPE-im: llama-quantize with llama-imatrix's imatrix of the calibration text (when .llamacpp/bin has the
  tools: `make llamacpp-tools`, or LLAMACPP_BIN).
Both `-cal`/`-gptq` files use llama.cpp's with-imatrix mix rules, so they have lc-TYPE-im's tensor types and size.
Judges (benchmarks/gguf_judge.py): quantkit (the GGUF dequantized into the HF model, fp32 torch, llama-perplexity's
chunks and scored tokens) and/or llama-perplexity --kl-divergence; KL to the f32 model's logits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gguf_judge as gj  # noqa: E402  (the shared protocol: texts, files, judges)

log = logging.getLogger("benchmarks.gguf_gptq")


def gptq_file(model: str, out: Path, type_name: str, calib_txt: Path, windows: int,
              options: dict | None = None, embed_type: str | None = None) -> tuple[Path, float]:
    """`quantkit quantize --method gptq --format gguf --type TYPE [--embed-type E]` (`options`: GPTQ's method
    options, --opt)."""
    from quantkit.api import quantize

    if out.exists():
        return out, float("nan")
    t = time.process_time()
    quantize(model, "gptq", out, fmt="gguf", gguf_type=type_name, embed_type=embed_type, device="cpu", options=options,
             calib={"dataset": str(calib_txt), "nsamples": windows, "seqlen": gj.CTX, "seed": 0})
    cpu = time.process_time() - t
    log.info("wrote %s in %.0f CPU s", out.name, cpu)
    return out, cpu


def importance(cache: Path, src: Path, tok, calib: str, windows: int) -> dict[str, np.ndarray]:
    """quantkit's statistics for the -cal files, kept in the work folder (the slowest step on a loaded machine)."""
    if not cache.exists():
        np.savez(cache, **gj.quantkit_importance(src, tok, calib, windows))
    with np.load(cache) as f:
        return {k: f[k] for k in f.files}


def ratios(rows: dict[str, dict], types: list[str]) -> list[str]:
    out = []
    for t in types:
        kld = {k.removeprefix(f"qk-{t}").removeprefix(f"lc-{t}") or "plain": v["kld"]
               for k, v in rows.items() if k.split("-")[1] == t and not (k.startswith("lc-") and not k.endswith("-im"))}
        lc = rows.get(f"lc-{t}-im", {}).get("kld")
        line = f"- {t}: gptq / cal KLD {kld['-gptq'] / kld['-cal']:.3f}x, gptq / plain {kld['-gptq'] / kld['plain']:.3f}x"
        if lc:
            line += (f", gptq / llama.cpp imatrix {kld['-gptq'] / lc:.3f}x, cal / llama.cpp imatrix "
                     f"{kld['-cal'] / lc:.3f}x")
        out.append(line)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="q4_k_m,q4_0")
    ap.add_argument("--judge", choices=("quantkit", "llamacpp", "both"), default="quantkit")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--imatrix-chunks", type=int, default=64, help="llama-imatrix chunks of 512 tokens")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-bench-gguf-gptq"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gguf_gptq.md")
    ap.add_argument("--threads", type=int, default=gj.THREADS, help="threads for torch and llama.cpp's tools")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    gj.configure(args.threads)
    from quantkit.models.sources import load_tokenizer, resolve

    src, calib, test, f32 = gj.prepare_work(args.model, args.work)
    tok = load_tokenizer(resolve(args.model))
    types = args.types.split(",")
    imp = importance(args.work / f"importance-{args.calib_windows}.npz", src, tok, calib, args.calib_windows)
    files: dict[str, Path] = {}
    cpu: dict[str, float] = {}
    for t in types:
        files[f"qk-{t}"] = gj.export(src, args.work / f"qk-{t}.gguf", t)
        files[f"qk-{t}-cal"] = gj.export(src, args.work / f"qk-{t}-cal.gguf", t, importance=imp)
        files[f"qk-{t}-gptq"], cpu[t] = gptq_file(args.model, args.work / f"qk-{t}-gptq.gguf", t,
                                                  args.work / "calib.txt", args.calib_windows)
    if gj.tools_ready():
        files.update(gj.llamacpp_files(args.work, f32, args.work / "calib.txt", types, args.imatrix_chunks))
    files = dict(sorted(files.items(), key=lambda kv: (types.index(kv[0].split("-")[1]), kv[0])))
    from gguf import GGUFReader

    params = sum(int(t.n_elements) for t in GGUFReader(str(f32)).tensors)
    cmd = (f"PYTHONPATH=. python benchmarks/gguf_gptq.py --types {args.types} --judge {args.judge} "
           f"--chunks {args.chunks} --calib-windows {args.calib_windows}")
    parts = [f"# GPTQ on the GGUF grid, {args.model}\n\n`{cmd}`\n"]
    if args.judge in ("quantkit", "both"):
        from quantkit.calib.data import tokenize

        rows = gj.judge_quantkit(src, tokenize(tok, test), files, args.chunks,
                                 args.work / f"judged-quantkit-{args.chunks}.json")
        parts += [f"## judge quantkit ({args.chunks} chunks of {gj.CTX})\n", gj.table(rows, files, params), "",
                  *ratios(rows, types), ""]
    if args.judge in ("llamacpp", "both"):
        rows = gj.judge_llamacpp(args.work, f32, args.work / "test.txt", files, args.chunks)
        parts += [f"## judge llama-perplexity ({args.chunks} chunks of {gj.CTX})\n", gj.table(rows, files, params), "",
                  *ratios(rows, types), ""]
    parts.append("GPTQ CPU seconds (whole quantize, this loaded machine): "
                 + ", ".join(f"{t} {s:.0f}" for t, s in cpu.items()))
    args.out.write_text("\n".join(parts) + "\n")
    log.info("%s\n%s", args.out, "\n".join(parts))


if __name__ == "__main__":
    main()
