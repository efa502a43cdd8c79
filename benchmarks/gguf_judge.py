"""GGUF K-quant mixes: quantkit's files, plain and calibrated, against llama.cpp's own, judged by KL to the f32 model.

    PYTHONPATH=. python benchmarks/gguf_judge.py [--types q4_0,q4_k_m,q3_k_m,iq4_xs] [--judge auto|llamacpp|quantkit]

Text (llamacpp-judge.md's protocol): wiki-vital joined; test text = the last 200,000 characters, calibration
text = the 300,000 characters before it. Files:
- f32: `quantkit convert --to gguf --type f32` (tensor for tensor what convert_hf_to_gguf.py writes);
- qk-TYPE: quantkit's mix, uncalibrated; qk-TYPE-cal: with llama.cpp's importance-weighted rounding fed by
  quantkit's activation statistics (64 windows of 512 tokens from the calibration text, seed 0);
- lc-TYPE / lc-TYPE-im: llama-quantize's, without / with an imatrix from llama-imatrix on the calibration text
  (its first --imatrix-chunks 512-token chunks, 64 by default)
  (only when `make llamacpp-tools` has built the tools).
Judges:
- llamacpp: `llama-perplexity --kl-divergence` against the f32 file's logits, 512-token chunks, the first 40
  (`--no-repack`: on a CPU with AMX, ggml's AMX weight buffers segfault on every quantized model in this VM,
  llama.cpp's own files included; without the extra buffers the same types run through ggml-cpu's kernels);
- quantkit: the same chunks and the same scored tokens (the second half of each chunk, as llama-perplexity
  scores them), every GGUF dequantized into the HF model and run by torch in fp32.
Columns: bytes, bits per weight (file bytes * 8 / parameters), PPL, mean KLD(f32 || file), same top-1 %.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
log = logging.getLogger("benchmarks.gguf")
TOOLS = ROOT / ".llamacpp" / "bin"
CTX, CHUNKS = 512, 40
THREADS = 2  # llama.cpp tools' -t and torch's threads; --threads sets it


def texts() -> tuple[str, str]:
    from quantkit.calib.data import BUILTIN, load_text

    full = load_text(BUILTIN)
    return full[-500_000:-200_000], full[-200_000:]


def configure(threads: int) -> None:
    """The scripts' shared set-up: `threads` for torch and llama.cpp's tools (-t); LLAMACPP_BIN, when set, is where
    the tools are."""
    import os

    import torch

    global THREADS, TOOLS
    THREADS = threads
    torch.set_num_threads(threads)
    if os.environ.get("LLAMACPP_BIN"):
        TOOLS = Path(os.environ["LLAMACPP_BIN"])


def prepare_work(model: str, work: Path) -> tuple[Path, str, str, Path]:
    """The scripts' shared work folder: (the model's folder, calibration text, test text, its f32 GGUF), the texts
    also written to work/calib.txt and work/test.txt (llama.cpp's tools read them)."""
    from quantkit.models.sources import resolve

    src = Path(resolve(model).path)
    work.mkdir(parents=True, exist_ok=True)
    calib, test = texts()
    (work / "calib.txt").write_text(calib)
    (work / "test.txt").write_text(test)
    return src, calib, test, export(src, work / "f32.gguf", "f32")


def tools_ready() -> bool:
    return all((TOOLS / t).is_file() for t in ("llama-quantize", "llama-imatrix", "llama-perplexity"))


def quantkit_importance(src: Path, tok, calib: str, windows: int = 64) -> dict[str, np.ndarray]:
    from quantkit.calib.data import sample_windows, tokenize
    from quantkit.convert.imatrix import compute_importance

    samples = sample_windows(tokenize(tok, calib), windows, CTX, 0)
    return compute_importance(src, samples=samples)


def export(src: Path, out: Path, type_name: str, importance=None) -> Path:
    from quantkit.convert.gguf_export import export_gguf

    if not out.exists():
        t = time.time()
        export_gguf(src, out, type_name, importance=importance)
        log.info("wrote %s in %.0f s", out.name, time.time() - t)
    return out


def run(cmd: list[str]) -> str:
    log.info("$ %s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{cmd[0]} failed:\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def llamacpp_files(work: Path, f32: Path, calib_txt: Path, types: list[str], chunks: int) -> dict[str, Path]:
    imat = work / f"lc-{chunks}.imatrix.gguf"
    if not imat.exists():
        run([str(TOOLS / "llama-imatrix"), "-m", str(f32), "-f", str(calib_txt), "-c", str(CTX),
             "-t", str(THREADS), "--chunks", str(chunks), "-o", str(imat)])
    out = {}
    for t in types:
        for tag, extra in (("", []), ("-im", ["--imatrix", str(imat)])):
            path = work / f"lc-{t}{tag}.gguf"
            if not path.exists():
                run([str(TOOLS / "llama-quantize"), *extra, str(f32), str(path), t.upper(), str(THREADS)])
            out[f"lc-{t}{tag}"] = path
    return out


def tensor_digest(path: Path) -> str:
    """sha256 of a GGUF's tensors (name, type, shape, bytes; in name order) and its hyperparameters (the
    architecture's keys): files that differ only in other metadata (file type, imatrix keys, provenance) score
    the same under either judge (llama-perplexity takes the test tokens from its base file, quantkit's judge from
    the text)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    h = hashlib.sha256()
    for name, field in sorted(reader.fields.items()):
        if name.startswith(arch + ".") or name == "general.architecture":
            for part in field.parts:
                h.update(np.ascontiguousarray(part).view(np.uint8))
    for t in sorted(reader.tensors, key=lambda t: t.name):  # llama-quantize writes another order
        h.update(f"{t.name}:{t.tensor_type.name}:{list(t.shape)};".encode())
        h.update(np.ascontiguousarray(t.data).view(np.uint8))
    return h.hexdigest()[:20]


def remembered_digest(path: Path) -> str:
    """tensor_digest, remembered in `digests.json` beside the file by (name, size, mtime)."""
    memo_path = path.parent / "digests.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    st = path.stat()
    key = f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = tensor_digest(path)
        tmp = memo_path.with_suffix(".part")
        tmp.write_text(json.dumps(memo, indent=1))
        tmp.replace(memo_path)
    return memo[key]


def judged(cache: Path, files: dict[str, Path], score) -> dict[str, dict]:
    """`score(path) -> row` once per distinct content (tensor_digest): byte-identical files (quantkit's and
    llama.cpp's uncalibrated files; q2_k and q3_k_s where both mixes fall back alike) share one judged row.
    Rows are kept in `cache` (JSON, digest -> row, written via a temporary name), so a rerun in the same work
    folder, with the same judge and chunks, judges only files it has not seen."""
    known = json.loads(cache.read_text()) if cache.exists() else {}
    rows = {}
    for label, path in files.items():
        digest = remembered_digest(path)
        if digest in known:
            log.info("%s: tensors already judged (%s), row reused", label, digest)
        else:
            known[digest] = score(path)
            tmp = cache.with_suffix(".part")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(cache)
        rows[label] = dict(known[digest])
        log.info("%s: %s", label, rows[label])
    return rows


def judge_llamacpp(work: Path, f32: Path, test_txt: Path, files: dict[str, Path], chunks: int) -> dict[str, dict]:
    base = work / f"f32-{chunks}.kld"
    ppl = [str(TOOLS / "llama-perplexity"), "-c", str(CTX), "-t", str(THREADS), "--no-repack"]
    if not base.exists():
        tmp = base.with_suffix(".part")
        run([*ppl, "-m", str(f32), "-f", str(test_txt), "--chunks", str(chunks), "--kl-divergence-base", str(tmp)])
        tmp.rename(base)

    def score(path: Path) -> dict:
        text = run([*ppl, "-m", str(path), "--kl-divergence-base", str(base), "--kl-divergence"])
        grab = {k: re.search(p, text) for k, p in (("ppl", r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
                                                    ("kld", r"Mean\s+KLD:\s*([\d.]+)"),
                                                    ("top", r"Same top p:\s*([\d.]+)"))}
        return {k: float(m.group(1)) if m else float("nan") for k, m in grab.items()}

    return judged(work / f"judged-llamacpp-{chunks}.json", files, score)


def gguf_into(model: torch.nn.Module, path: Path) -> None:
    """Dequantize every tensor of `path` into `model` (the HF model it was exported from), undoing what the export
    did to values: the q/k permutation (Llama), the norm shift (Gemma)."""
    from gguf import GGUFReader, TensorNameMap

    from quantkit.convert.gguf_arch import GGUF_ARCHS
    from quantkit.convert.gguf_quant import dequantize_rows
    from quantkit.convert.gguf_tensors import qk_permutation

    cfg = model.config
    spec = GGUF_ARCHS[cfg.architectures[0]]
    tmap = TensorNameMap(spec.arch, cfg.num_hidden_layers)
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None or gname not in tensors:
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                raise KeyError(f"{name} ({gname}) is not in {path.name}")
            t = tensors[gname]
            cols = p.shape[-1]
            w = torch.from_numpy(dequantize_rows(np.asarray(t.data), t.tensor_type, cols).reshape(p.shape).copy())
            if spec.permute_qk and (".q_proj." in name or ".k_proj." in name):
                perm = qk_permutation(p.shape[0], heads if ".q_proj." in name else kv)
                back = torch.empty_like(w)
                back[perm] = w
                w = back
            if p.dim() == 1 and name.endswith("norm.weight"):
                w = w - spec.norm_shift
            p.copy_(w)


@torch.no_grad()
def judge_quantkit(src: Path, test_ids: list[int], files: dict[str, Path], n_chunks: int,
                   cache: Path | None = None) -> dict[str, dict]:
    from quantkit.loading import load

    chunks = torch.tensor(test_ids[: n_chunks * CTX]).reshape(n_chunks, CTX)
    first = CTX // 2
    state: dict = {}  # the model and the f32 log-probs, made at the first file not in the cache

    def score(path: Path) -> dict:
        if not state:
            state["model"] = model = load(src, device="cpu").float().eval()
            state["base"] = [torch.log_softmax(model(c[None]).logits[0, first:-1].float(), -1).to(torch.float16)
                             for c in chunks]
        model = state["model"]
        gguf_into(model, path)
        nll = kld = same = n = 0.0
        for c, blp in zip(chunks, state["base"]):
            lp = torch.log_softmax(model(c[None]).logits[0, first:-1].float(), -1)
            b = blp.float()
            tgt = c[first + 1:]
            nll += float(-lp.gather(1, tgt[:, None]).sum())
            kld += float((b.exp() * (b - lp)).sum())
            same += float((lp.argmax(-1) == b.argmax(-1)).sum())
            n += len(tgt)
        return {"ppl": float(np.exp(nll / n)), "kld": kld / n, "top": 100 * same / n}

    if cache is None:
        return {label: score(path) for label, path in files.items()}
    return judged(cache, files, score)


def table(rows: dict[str, dict], files: dict[str, Path], params: int) -> str:
    lines = ["| file | bytes | bpw | PPL | mean KLD | same top-1 % |", "|---|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        size = files[label].stat().st_size
        lines.append(f"| {label} | {size} | {size * 8 / params:.3f} | {r['ppl']:.4f} | {r['kld']:.6f} | "
                     f"{r['top']:.3f} |")
    pairs = [(t, f"qk-{t}{a}", f"lc-{t}{b}") for t in dict.fromkeys(k.split("-")[1] for k in rows)
             for a, b in (("-cal", "-im"), ("", ""))]
    pairs = [p for p in pairs if p[1] in rows and p[2] in rows]
    if pairs:
        lines += ["", "| type | quantkit / llama.cpp | KLD ratio | size ratio | PPL ratio |", "|---|---|---:|---:|---:|"]
        for t, mine, theirs in pairs:
            size = files[mine].stat().st_size / files[theirs].stat().st_size
            lines.append(f"| {t} | {mine} / {theirs} | {rows[mine]['kld'] / rows[theirs]['kld']:.3f} | {size:.6f} | "
                         f"{rows[mine]['ppl'] / rows[theirs]['ppl']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="q4_0,q4_k_m,q3_k_m,iq4_xs")
    ap.add_argument("--judge", choices=("auto", "llamacpp", "quantkit"), default="auto")
    ap.add_argument("--chunks", type=int, default=CHUNKS, help="512-token test chunks scored (llama.cpp's --chunks)")
    ap.add_argument("--calib-windows", type=int, default=64, help="512-token windows for quantkit's statistics")
    ap.add_argument("--imatrix-chunks", type=int, default=64, help="512-token chunks of the calibration text for "
                    "llama-imatrix (its first ones; quantkit samples --calib-windows windows of the same text)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-bench-gguf"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gguf-judge.md")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads for torch and llama.cpp's tools")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    from quantkit.models.sources import load_tokenizer, resolve

    src = Path(resolve(args.model).path)
    tok = load_tokenizer(resolve(args.model))
    args.work.mkdir(parents=True, exist_ok=True)
    calib, test = texts()
    (args.work / "calib.txt").write_text(calib)
    (args.work / "test.txt").write_text(test)
    types = args.types.split(",")
    judge = ("llamacpp" if tools_ready() else "quantkit") if args.judge == "auto" else args.judge
    f32 = export(src, args.work / "f32.gguf", "f32")
    imp = None
    files: dict[str, Path] = {}
    for t in types:
        files[f"qk-{t}"] = export(src, args.work / f"qk-{t}.gguf", t)
        if imp is None and not (args.work / f"qk-{t}-cal.gguf").exists():
            imp = quantkit_importance(src, tok, calib, args.calib_windows)
        files[f"qk-{t}-cal"] = export(src, args.work / f"qk-{t}-cal.gguf", t, importance=imp)
    if tools_ready():
        files.update(llamacpp_files(args.work, f32, args.work / "calib.txt", types, args.imatrix_chunks))
    files = dict(sorted(files.items(), key=lambda kv: (types.index(kv[0].split("-")[1]), kv[0])))
    if judge == "llamacpp":
        rows = judge_llamacpp(args.work, f32, args.work / "test.txt", files, args.chunks)
    else:
        from quantkit.calib.data import tokenize

        rows = judge_quantkit(src, tokenize(tok, test), files, args.chunks,
                              args.work / f"judged-quantkit-{args.chunks}.json")
    from gguf import GGUFReader

    params = sum(int(t.n_elements) for t in GGUFReader(str(f32)).tensors)
    md = table(rows, files, params)
    cmd = (f"PYTHONPATH=. python benchmarks/gguf_judge.py --model {args.model} --types {args.types} --judge {judge} "
           f"--chunks {args.chunks} "
           f"--calib-windows {args.calib_windows} --imatrix-chunks {args.imatrix_chunks}")
    args.out.write_text(f"# GGUF mixes on {args.model}: judge {judge}\n\n`{cmd}`\n\n{md}\n")
    log.info("%s\n%s", args.out, md)


if __name__ == "__main__":
    main()
