"""GPTQ-on-the-grid settings at one GGUF type, judged in fp32 against llama.cpp's imatrix file of that type.

    PYTHONPATH=. python benchmarks/gguf_gptq_levers.py --type q5_k_s --work DIR \
        --variant base:32 --variant w64:64 --variant f32calib:32:calib_dtype=float32,hessian_products=float32

Each --variant NAME:WINDOWS[:KEY=VALUE,...] writes DIR/qk-TYPE-gptq-NAME.gguf with `quantkit quantize --method gptq
--format gguf --type TYPE` (benchmarks/gguf_gptq.py's calibration: WINDOWS windows of 512 tokens of the calibration
text, seed 0; KEY=VALUE are GPTQ's method options, the CLI's --opt). DIR must hold what benchmarks/gguf_floor.py (or
gguf_gptq.py) made there: the f32 file, calib.txt/test.txt and lc-TYPE-im.gguf. The judge is quantkit's
(benchmarks/gguf_judge.py: every GGUF dequantized into the HF model, fp32 torch, llama-perplexity's chunks and
scored tokens); rows are cached by tensor digest in DIR/judged-quantkit-CHUNKS.json, shared with the other scripts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gguf_floor as floor  # noqa: E402
import gguf_gptq as gg  # noqa: E402
import gguf_judge as gj  # noqa: E402

log = logging.getLogger("benchmarks.gguf_gptq_levers")


def parse_variant(text: str) -> tuple[str, int, dict]:
    name, windows, *rest = text.split(":")
    opts = {}
    for kv in (rest[0].split(",") if rest and rest[0] else []):
        k, v = kv.split("=")
        opts[k] = {"true": True, "false": False}.get(v.lower(), v)
        if isinstance(opts[k], str):
            try:
                opts[k] = int(v) if v.lstrip("-").isdigit() else float(v)
            except ValueError:
                pass
    return name, int(windows), opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--type", default="q5_k_s")
    ap.add_argument("--variant", action="append", required=True, help="NAME:WINDOWS[:KEY=VALUE,...]")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--imatrix-chunks", default="", help="also llama.cpp imatrix files from N-chunk imatrices "
                    "(comma list), made in DIR by llama-imatrix/llama-quantize (LLAMACPP_BIN or .llamacpp/bin)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--llamacpp", action="store_true", help="also judge each file by llama-perplexity "
                    "--kl-divergence against DIR's f32 file (gguf_floor.py's rows and KL base, kept in DIR)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=gj.THREADS)
    ap.add_argument("--embed-type", default=None, help="the quantkit files' token embedding/output type (--embed-type; "
                    "llama.cpp's files keep the mix's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    gj.configure(args.threads)
    from quantkit.calib.data import tokenize
    from quantkit.models.sources import load_tokenizer, resolve

    src = Path(resolve(args.model).path)
    t = args.type
    lc = args.work / f"lc-{t}-im.gguf"
    if not lc.exists():
        raise SystemExit(f"{lc} is missing: run benchmarks/gguf_floor.py --work {args.work} first")
    files = {"lc-im": lc}
    if args.imatrix_chunks:
        for n in args.imatrix_chunks.split(","):
            sub = args.work / f"im{n}"  # llamacpp_files names its outputs by type only
            sub.mkdir(exist_ok=True)
            files[f"lc-im{n}"] = floor.imatrix_file(sub, args.work / "f32.gguf", args.work / "calib.txt", [t],
                                                    int(n))[t]
    cpu = {}
    variants = [parse_variant(v) for v in args.variant]
    for name, windows, opts in variants:
        tag = f"e{args.embed_type}-" if args.embed_type else ""
        files[f"gptq-{name}"], cpu[name] = gg.gptq_file(args.model, args.work / f"qk-{t}-{tag}gptq-{name}.gguf", t,
                                                        args.work / "calib.txt", windows, opts or None, args.embed_type)
    test = (args.work / "test.txt").read_text()
    rows = gj.judge_quantkit(src, tokenize(load_tokenizer(resolve(args.model)), test), files, args.chunks,
                             args.work / f"judged-quantkit-{args.chunks}.json")
    if args.llamacpp:  # K = KLD(f32 || file) by llama.cpp, the rows after the fp32 judge's
        judge = floor.Judge(args.work, args.work / "test.txt", args.chunks)
        lk = {label: judge.score(f, args.work / "f32.gguf") for label, f in files.items()}
    lcs = [k for k in files if k.startswith("lc-")]
    lines = ["| file | windows | options | bytes | PPL | mean KLD | same top-1 % | "
             + " | ".join(f"/ {k}" for k in lcs) + " | CPU s |", "|---|---:|---|---:|---:|---:|---:|"
             + "---:|" * len(lcs) + "---:|"]
    for label, f in files.items():
        r = rows[label]
        v = next((v for v in variants if f"gptq-{v[0]}" == label), None)
        o = "-" if v is None else ", ".join(f"{k}={x}" for k, x in v[2].items()) or "defaults"
        lines.append(f"| {label} | {'-' if v is None else v[1]} | {o} | {f.stat().st_size:,} | {r['ppl']:.4f} | "
                     f"{r['kld']:.6f} | {r['top']:.3f} | " + " | ".join(f"{r['kld'] / rows[k]['kld']:.3f}" for k in lcs)
                     + f" | {'-' if v is None else format(cpu[v[0]], '.0f')} |")
    if args.llamacpp:
        lines += ["", "llama-perplexity --kl-divergence against the f32 file (same chunks):", "",
                  "| file | PPL | mean KLD | same top-1 % | " + " | ".join(f"/ {k}" for k in lcs) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(lcs)]
        lines += [f"| {label} | {r['ppl']:.4f} | {r['kld']:.6f} | {r['top']:.3f} | "
                  + " | ".join(f"{r['kld'] / lk[k]['kld']:.3f}" for k in lcs) + " |" for label, r in lk.items()]
    cmd = (f"PYTHONPATH=. python benchmarks/gguf_gptq_levers.py --model {args.model} --type {t} --chunks {args.chunks} "
           + (f"--imatrix-chunks {args.imatrix_chunks} " if args.imatrix_chunks else "")
           + ("--llamacpp " if args.llamacpp else "")
           + (f"--embed-type {args.embed_type} " if args.embed_type else "")
           + " ".join(f"--variant {v}" for v in args.variant))
    md = f"# GPTQ on the {t} grid: settings, {args.model}, quantkit's fp32 judge ({args.chunks} chunks)\n\n`{cmd}`\n\n" \
         + "\n".join(lines) + "\n\nCPU s: the whole quantize (nan: the file was already there).\n"
    embed = f"-e{args.embed_type}" if args.embed_type else ""
    out = args.out or ROOT / f"benchmarks/results/gguf_gptq_levers-{t}{embed}.md"
    out.write_text(md)
    log.info("%s\n%s", out, md)


if __name__ == "__main__":
    main()
