"""Gemma 3 GGUF export checked on the real model (gemma3-270m) with llama.cpp as the client.

    PYTHONPATH=. python benchmarks/gguf_gemma3_check.py [--reference REF.gguf] [--types f32,q8_0,q4_k_m]

- metadata and tensors against llama.cpp's own convert_hf_to_gguf.py file (--reference, its f32 output):
  every key compared, every tensor's max |delta|;
- tokens: llama.cpp's tokenizer (vocab_only, the exported file) against transformers' on the wiki-vital test text
  (last 200,000 characters), the 300,000 calibration characters before it, and the converter's probe text;
- logits on a short real text (BOS + 46 tokens): llama.cpp's f32 file against the float HF model, and each
  quantized file against the HF model holding the file's dequantized weights (benchmarks/gguf_judge.gguf_into);
  as shares of max |logit|: max and rms |diff|, and same top-1 %.
Writes benchmarks/results/gguf-gemma3.md (or --out).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
log = logging.getLogger("benchmarks.gguf_gemma3")
TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. It is 330 metres tall, and for 41 years it "
        "was the tallest man-made structure in the world.")


def kv_diff(ref: Path, mine: Path) -> list[str]:
    from gguf import GGUFReader

    def kv(path):
        return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}

    a, b = kv(ref), kv(mine)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "(absent)"), b.get(k, "(absent)")
        if va == vb:
            continue
        if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
            diff = [i for i in range(len(va)) if va[i] != vb[i]]
            out.append(f"`{k}`: {len(diff)} of {len(va)} entries differ (first ids {diff[:4]}: "
                       f"{[va[i] for i in diff[:2]]} vs {[vb[i] for i in diff[:2]]})")
        else:
            out.append(f"`{k}`: {str(va)[:60]!r} vs {str(vb)[:60]!r}")
    return out


def tensor_diff(ref: Path, mine: Path) -> tuple[int, float, list[str]]:
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(str(ref)).tensors}
    b = {t.name: t for t in GGUFReader(str(mine)).tensors}
    worst, bad = 0.0, sorted(set(a) ^ set(b))
    for name in set(a) & set(b):
        x, y = a[name], b[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            bad.append(name)
            continue
        worst = max(worst, float(np.abs(np.asarray(x.data, np.float64) - np.asarray(y.data, np.float64)).max()))
    return len(a), worst, bad


def logits_llamacpp(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    out = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--reference", type=Path, help="llama.cpp's convert_hf_to_gguf.py --outtype f32 file of the model")
    ap.add_argument("--types", default="f32,q8_0,q4_k_m")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-bench-gemma3"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gguf-gemma3.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.gguf_judge import export, gguf_into, texts
    from quantkit.convert.gguf_vocab import PROBE
    from quantkit.models.sources import resolve

    src = Path(resolve(args.model).path)
    args.work.mkdir(parents=True, exist_ok=True)
    files = {t: export(src, args.work / f"{t}.gguf", t) for t in args.types.split(",")}
    lines = [f"# Gemma 3 GGUF export checked in llama.cpp: {args.model}", "",
             f"`PYTHONPATH=. python benchmarks/gguf_gemma3_check.py --types {args.types}"
             f"{' --reference REF.gguf' if args.reference else ''}`", ""]
    if args.reference and "f32" in files:
        n, worst, bad = tensor_diff(args.reference, files["f32"])
        lines += [f"Against llama.cpp's convert_hf_to_gguf.py f32 file: {n} tensors, max |delta| {worst:g}, "
                  f"names/types/shapes differing: {bad or 'none'}. Keys that differ:", ""]
        lines += [f"- {d}" for d in kv_diff(args.reference, files["f32"])] + [""]
    tok = AutoTokenizer.from_pretrained(src)
    calib, test = texts()
    any_file = next(iter(files.values()))
    vocab = Llama(model_path=str(any_file), vocab_only=True, verbose=False)
    lines += ["| text | characters | transformers tokens | llama.cpp tokens | equal |", "|---|---:|---:|---:|---|"]
    for name, text in (("wiki-vital test", test), ("calibration", calib), ("probe", PROBE)):
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = vocab.tokenize(text.encode(), add_bos=False)
        lines.append(f"| {name} | {len(text)} | {len(a)} | {len(b)} | {a == b} |")
    vocab.close()
    ids = [tok.bos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        exact = model(torch.tensor([ids])).logits[0].numpy()
    lines += ["", f"Logits on BOS + {len(ids) - 1} tokens of real text, as shares of max |logit|:", "",
              "| file | bytes | compared with | max diff % | rms diff % | same top-1 % | quantization rms % |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for t, path in files.items():
        theirs = logits_llamacpp(path, ids)
        if t == "f32":
            mine, against = exact, "float HF model"
        else:
            gguf_into(model, path)
            with torch.no_grad():
                mine = model(torch.tensor([ids])).logits[0].numpy()
            against = "HF model, file's weights dequantized"
        scale = np.abs(mine).max()
        quant = np.sqrt(((mine - exact) ** 2).mean()) / scale * 100
        lines.append(f"| {t} | {path.stat().st_size} | {against} | {np.abs(theirs - mine).max() / scale * 100:.3f} | "
                     f"{np.sqrt(((theirs - mine) ** 2).mean()) / scale * 100:.3f} | "
                     f"{(theirs.argmax(-1) == mine.argmax(-1)).mean() * 100:.1f} | {quant:.3f} |")
    args.out.write_text("\n".join(lines) + "\n")
    log.info("%s\n%s", args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
