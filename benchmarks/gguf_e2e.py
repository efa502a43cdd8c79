"""GPTQ on the GGUF grid, then the end-to-end stage on the same grid (`--opt e2e_steps`), judged by llama.cpp.

    PYTHONPATH=. python benchmarks/gguf_e2e.py --types q5_k_m [--steps 32 --batch 4] [--make-only] [--work DIR]

Per type, on benchmarks/gguf_judge.py's text split (32 calibration windows of 512 tokens, seed 0, as sessions
15-16's q5 rows):
- qk-TYPE-gptq-auto: `quantize --method gptq --format gguf --type TYPE --opt activations=auto`;
- qk-TYPE-gptq-auto-e2eS-bB: the same, then S end-to-end steps of B windows: each block's float16 scale and min,
  and the norms, tuned against the float model's logits (`quantkit.methods.e2e.headers`); codes unchanged;
- lc-TYPE-im: llama-quantize with a 32-chunk llama-imatrix imatrix of the calibration text.
Judge: llama-perplexity --kl-divergence against the f32 GGUF, 40 chunks of 512 tokens of the test text
(`gguf_floor.Judge`, rows cached in the work folder). `--make-only` writes the quantkit files and stops (the
tools are not needed for that). Results: benchmarks/results/gguf_e2e.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gguf_floor as fl  # noqa: E402
import gguf_gptq as gg  # noqa: E402
import gguf_judge as gj  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "gguf_e2e.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="q5_k_m")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="the stage's Adam step (e2e_lr)")
    ap.add_argument("--norms", default="additive", choices=["additive", "relative", "off"], help="e2e_norms")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-gguf-e2e"))
    ap.add_argument("--variants", default="base,e2e", help="comma list of base (GPTQ alone) and e2e")
    ap.add_argument("--make-only", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("quantkit.methods.e2e").setLevel(logging.DEBUG)  # the stage's KL step by step
    gj.configure(a.threads)
    _, _, _, f32 = gj.prepare_work(a.model, a.work)
    calib = a.work / "calib.txt"
    types = a.types.split(",")
    base_opts = {"activations": "auto"}
    tag = (f"e2e{a.steps}-b{a.batch}" + ("" if a.lr == 1e-3 else f"-lr{a.lr:g}")
           + ("" if a.norms == "additive" else f"-norms-{a.norms}"))
    made: dict[tuple[str, str], tuple[Path, float]] = {}
    for t in types:
        for v in a.variants.split(","):
            opts = dict(base_opts) if v == "base" else {**base_opts, "e2e_steps": a.steps, "e2e_batch_size": a.batch,
                                                                      "e2e_lr": a.lr, "e2e_norms": a.norms}
            name = f"qk-{t}-gptq-auto{'' if v == 'base' else '-' + tag}.gguf"
            made[(t, v)] = gg.gptq_file(a.model, a.work / name, t, calib, a.windows, opts)
    if a.make_only:
        return
    if not gj.tools_ready():
        raise SystemExit("llama.cpp's tools are missing: make llamacpp-tools (or LLAMACPP_BIN)")
    lc = fl.imatrix_file(a.work, f32, calib, types, 32)
    judge = fl.Judge(a.work, a.work / "test.txt", a.chunks)
    lines = [f"| type | file | bytes | mean KLD | PPL | same top-1 % | / llama.cpp imatrix | quantize CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in types:
        ref = judge.score(lc[t], f32)
        lines.append(f"| {t} | llama.cpp imatrix | {lc[t].stat().st_size:,} | {ref['kld']:.6f} | {ref['ppl']:.4f} | "
                     f"{ref['top']:.3f} | 1 | - |")
        for (tt, v), (path, cpu) in made.items():
            if tt != t:
                continue
            r = judge.score(path, f32)
            what = "GPTQ, activations=auto" if v == "base" else f"+ end-to-end {a.steps} x {a.batch} windows, lr {a.lr:g}, norms {a.norms}"
            lines.append(f"| {t} | {what} | {path.stat().st_size:,} | {r['kld']:.6f} | {r['ppl']:.4f} | "
                         f"{r['top']:.3f} | **{r['kld'] / ref['kld']:.3f}** | {cpu:.0f} |")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    text = (f"# GGUF: the end-to-end stage on llama.cpp's grids ({a.model}, {stamp})\n\n"
            f"`PYTHONPATH=. python benchmarks/gguf_e2e.py --types {a.types} --steps {a.steps} --batch {a.batch} --lr {a.lr:g} --norms {a.norms} "
            f"--threads {a.threads}`; llama-perplexity --kl-divergence, {a.chunks} chunks of 512 against the f32 "
            f"GGUF; {a.windows} calibration windows of 512 tokens, seed 0.\n\n" + "\n".join(lines) + "\n")
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
