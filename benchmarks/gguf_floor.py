"""llama.cpp's activation floor at 5-8 bits: how much of llama-perplexity's KLD no weight rounding can remove.

    PYTHONPATH=. python benchmarks/gguf_floor.py [--types q5_k_s,q5_k_m,q6_k,q8_0] [--chunks 10] [--fp32]

llama.cpp's CPU matmul quantizes each quantized weight's activations to 8 bits (Q8_0/Q8_1/Q8_K blocks, the
weight type's vec_dot_type); an F32 weight runs against float32 activations. So for a GGUF file X of type T:
- deq(X): the f32 GGUF (`quantkit convert --to gguf --type f32`, tensor for tensor what convert_hf_to_gguf.py
  writes) with every tensor replaced by X's dequantized values (gguf.quants.dequantize, llama.cpp's
  Python reference decoders, which compute ggml's dequantize_row_* in the same float32 operations), same
  metadata, same tensor order: X's weights, run without activation quantization;
- K(X) = KLD(f32 || X): the issue's metric (llama-perplexity --kl-divergence against the real f32 file);
- F(X) = KLD(deq(X) || X): X judged against its own weights in float32, so its weights carry no error and the
  KLD is llama.cpp's activation quantization alone (the floor);
- W(X) = KLD(f32 || deq(X)): the weight error alone, by llama.cpp's own float32 path;
- with --fp32, quantkit's fp32 judge of X too (benchmarks/gguf_judge.py; it should match W).
Files (as benchmarks/gguf_gptq.py makes them, same text split, same names): lc-T-im (llama-quantize with
llama-imatrix's imatrix of the calibration text) and qk-T-gptq (`quantkit quantize --method gptq --format gguf`,
--calib-windows windows of 512 tokens of the calibration text, seed 0). Every row judged in this run: one f32 KL
base for K and W, one deq base per file for F; each deq file and its base are deleted once judged.
The target (issue #19) is K(qk) <= 0.8 K(lc). If F(lc) >= 0.8 K(lc), no file of type T can meet it under this
judge (its KLD cannot go below the activation floor); if the KLDs add (K ~ W + F), a file needs
W <= 0.8 W(lc) - 0.2 F to meet it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gguf_gptq as gg  # noqa: E402
import gguf_judge as gj  # noqa: E402

log = logging.getLogger("benchmarks.gguf_floor")


def imatrix_file(work: Path, f32: Path, calib_txt: Path, types: list[str], chunks: int) -> dict[str, Path]:
    """lc-T-im for each type (gguf_judge.llamacpp_files without the plain files)."""
    imat = work / f"lc-{chunks}.imatrix.gguf"
    if not imat.exists():
        gj.run([str(gj.TOOLS / "llama-imatrix"), "-m", str(f32), "-f", str(calib_txt), "-c", str(gj.CTX),
                "-t", str(gj.THREADS), "--chunks", str(chunks), "-o", str(imat)])
    out = {}
    for t in types:
        path = work / f"lc-{t}-im.gguf"
        if not path.exists():
            gj.run([str(gj.TOOLS / "llama-quantize"), "--imatrix", str(imat), str(f32), str(path), t.upper(),
                    str(gj.THREADS)])
        out[t] = path
    return out


def dequantized_copy(f32: Path, src: Path, out: Path) -> Path:
    """f32's file with each tensor's data replaced by src's dequantized values (same names, shapes, metadata)."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    if out.exists():
        return out
    part = out.with_suffix(".part")
    shutil.copyfile(f32, part)
    dst = {t.name: t for t in GGUFReader(str(part), "r+").tensors}
    srcs = GGUFReader(str(src)).tensors
    if sorted(t.name for t in srcs) != sorted(dst):
        raise ValueError(f"{src.name} and {f32.name} hold different tensors")
    for t in srcs:
        d = dst[t.name]
        if d.tensor_type != GGMLQuantizationType.F32 or list(d.shape) != list(t.shape):
            raise ValueError(f"{t.name}: {d.tensor_type.name} {list(d.shape)} vs {list(t.shape)}")
        d.data[...] = dequantize(np.asarray(t.data), t.tensor_type).reshape(d.data.shape)
        d.data.flush()
    del dst
    check = {t.name: t for t in GGUFReader(str(part)).tensors}  # read back from the file: every value
    for t in srcs:
        if not np.array_equal(np.asarray(check[t.name].data).reshape(-1),
                              dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)):
            raise RuntimeError(f"{part.name}: {t.name} did not take {src.name}'s values")
    part.replace(out)
    return out


class Judge:
    """llama-perplexity --kl-divergence runs, each row kept in `cache` (JSON) under 'file|base'."""

    def __init__(self, work: Path, test_txt: Path, chunks: int):
        self.work, self.test_txt, self.chunks = work, test_txt, chunks
        self.cache = work / f"floor-{chunks}.json"
        self.rows = json.loads(self.cache.read_text()) if self.cache.exists() else {}
        self.ppl = [str(gj.TOOLS / "llama-perplexity"), "-c", str(gj.CTX), "-t", str(gj.THREADS), "--no-repack"]

    def base(self, model: Path) -> Path:
        kld = self.work / f"{model.stem}-{self.chunks}.kld"
        if not kld.exists():
            tmp = kld.with_suffix(".part")
            gj.run([*self.ppl, "-m", str(model), "-f", str(self.test_txt), "--chunks", str(self.chunks),
                    "--kl-divergence-base", str(tmp)])
            tmp.rename(kld)
        return kld

    def known(self, model: Path, base_name: str) -> bool:
        return f"{model.name}|{base_name}" in self.rows

    def score(self, model: Path, base_model: Path) -> dict:
        key = f"{model.name}|{base_model.name}"
        if key not in self.rows:
            text = gj.run([*self.ppl, "-m", str(model), "--kl-divergence-base", str(self.base(base_model)),
                           "--kl-divergence"])
            grab = {k: re.search(p, text) for k, p in (("ppl", r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
                                                        ("kld", r"Mean\s+KLD:\s*([\d.]+)"),
                                                        ("top", r"Same top p:\s*([\d.]+)"))}
            self.rows[key] = {k: float(m.group(1)) if m else float("nan") for k, m in grab.items()}
            tmp = self.cache.with_suffix(".part")
            tmp.write_text(json.dumps(self.rows, indent=1))
            tmp.replace(self.cache)
        log.info("%s: %s", key, self.rows[key])
        return self.rows[key]


def floor(judge: Judge, f32: Path, x: Path, keep: bool) -> dict[str, dict]:
    """F(X) and W(X): X against deq(X), deq(X) against f32."""
    deq = judge.work / f"deq-{x.stem}.gguf"
    if not (judge.known(x, deq.name) and judge.known(deq, f32.name)):
        dequantized_copy(f32, x, deq)
    rows = {"F": judge.score(x, deq), "W": judge.score(deq, f32)}
    if not keep:
        for p in (deq, judge.work / f"{deq.stem}-{judge.chunks}.kld"):
            p.unlink(missing_ok=True)
    return rows


def report(types: list[str], files: dict[str, dict[str, Path]], r: dict, fp32: dict) -> list[str]:
    lines = ["| type | file | bytes | K = KLD(f32 ‖ file) | PPL | F = KLD(deq ‖ file) | W = KLD(f32 ‖ deq) | "
             "W + F | fp32 judge |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for t in types:
        for tag, path in files[t].items():
            row = r.get((t, tag), {})
            k, f, w = (row.get(x, {}).get("kld", float("nan")) for x in "KFW")
            q = fp32.get(f"{tag}-{t}", {}).get("kld", float("nan"))
            lines.append(f"| {t} | {tag} | {path.stat().st_size:,} | {k:.6f} | {row.get('K', {}).get('ppl', 0):.4f} | "
                         f"{f:.6f} | {w:.6f} | {w + f:.6f} | {q:.6f} |")
        lc, qk = r.get((t, "lc-im"), {}), r.get((t, "qk-gptq"), {})
        if "K" in lc and "F" in lc:
            k, f = lc["K"]["kld"], lc["F"]["kld"]
            line = (f"- {t}: floor F(lc) = {f:.6f} = {f / k:.3f} x K(lc) {k:.6f}; target 0.8 x K(lc) = {0.8 * k:.6f}: "
                    + ("the floor is above it: no file of this type can meet the target under llama-perplexity"
                       if f >= 0.8 * k else "the floor is below it"))
            if "W" in lc:
                line += f"; a file meets it only with W <= 0.8 W(lc) - 0.2 F = {0.8 * lc['W']['kld'] - 0.2 * f:.6f}"
            if "K" in qk:
                line += f"; GPTQ K/K(lc) = {qk['K']['kld'] / k:.3f}"
                if "W" in qk:
                    line += f", W(GPTQ) = {qk['W']['kld']:.6f}"
            notes.append(line)
    return lines + [""] + notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="q5_k_s,q5_k_m,q6_k,q8_0")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--imatrix-chunks", type=int, default=32)
    ap.add_argument("--fp32", action="store_true", help="also judge each file with quantkit's fp32 judge")
    ap.add_argument("--keep", action="store_true", help="keep the deq files and their KL bases")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-bench-gguf-floor"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gguf_floor.md")
    ap.add_argument("--threads", type=int, default=gj.THREADS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    gj.configure(args.threads)
    if not gj.tools_ready():
        raise SystemExit(f"llama.cpp's tools are not in {gj.TOOLS}: `make llamacpp-tools` or LLAMACPP_BIN")
    from quantkit.models.sources import load_tokenizer, resolve

    src, _, test, f32 = gj.prepare_work(args.model, args.work)
    types = args.types.split(",")
    lc = imatrix_file(args.work, f32, args.work / "calib.txt", types, args.imatrix_chunks)
    judge = Judge(args.work, args.work / "test.txt", args.chunks)
    cmd = (f"PYTHONPATH=. python benchmarks/gguf_floor.py --model {args.model} --types {args.types} "
           f"--chunks {args.chunks} --calib-windows {args.calib_windows} --imatrix-chunks {args.imatrix_chunks}"
           + (" --fp32" if args.fp32 else ""))
    r: dict = {}
    fp32: dict = {}
    files: dict[str, dict[str, Path]] = {t: {"lc-im": lc[t]} for t in types}

    def write() -> str:  # after every file: a killed run keeps what it measured
        md = "\n".join(report(types, files, r, fp32))
        args.out.write_text(f"# llama.cpp's activation floor, {args.model}\n\n`{cmd}`\n\nllama-perplexity, "
                            f"{args.chunks} chunks of {gj.CTX}; fp32 judge: quantkit's, same chunks and tokens.\n\n"
                            f"{md}\n")
        return md

    for t in types:  # the floor first: it needs no GPTQ file
        r[(t, "lc-im")] = {"K": judge.score(lc[t], f32), **floor(judge, f32, lc[t], args.keep)}
        write()
    for t in types:
        files[t]["qk-gptq"], _ = gg.gptq_file(args.model, args.work / f"qk-{t}-gptq.gguf", t,
                                              args.work / "calib.txt", args.calib_windows)
        x = files[t]["qk-gptq"]
        r[(t, "qk-gptq")] = {"K": judge.score(x, f32)}
        write()
    for t in types:
        r[(t, "qk-gptq")].update(floor(judge, f32, files[t]["qk-gptq"], args.keep))
        write()
    if args.fp32:
        from quantkit.calib.data import tokenize

        flat = {f"{tag}-{t}": p for t in types for tag, p in files[t].items()}
        fp32.update(gj.judge_quantkit(src, tokenize(load_tokenizer(resolve(args.model)), test), flat, args.chunks,
                                      args.work / f"judged-quantkit-{args.chunks}.json"))
    md = write()
    log.info("%s\n%s", args.out, md)


if __name__ == "__main__":
    main()
