"""Screen of the rotation lever (issue #20, `--rotate`): the norms folded alone, and folded then rotated.

    .venv/bin/python benchmarks/rotation.py --rows rtn-w4g64,gptq-w4g64 --variants none,fold,hadamard --windows 20

Each variant's fp32 model is written once to --work (`quantkit.models.rotation.rotate_model`; "fold" uses the
identity, so only the norms move into the Linears), checked against the original on one window, quantized from
there with quantkit's API and scored against the ORIGINAL base. JSON lines: benchmarks/results/rotation.jsonl.
The product path is `quantkit quantize --rotate hadamard` (rows `*-rot` of benchmarks/quality.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _proc import cpu_s, peak_mib  # noqa: E402
from quality import parse_row  # noqa: E402  (benchmarks/quality.py: the row names)

log = logging.getLogger("benchmarks.rotation")


def build(model_name: str, variant: str, work: Path, seed: int) -> Path:
    """The variant's fp32 model folder (written once), checked against the original on one window."""
    from quantkit.calib.data import test_windows
    from quantkit.models.arch import get_arch
    from quantkit.models.rotation import rotate_model
    from quantkit.models.sources import load_model, resolve

    out = work / f"{model_name}-{variant}"
    if (out / "config.json").is_file():
        return out
    base, tok = load_model(resolve(model_name), torch.float32)
    model, _ = load_model(resolve(model_name), torch.float32)
    if variant != "none":
        d = model.config.hidden_size
        eye = torch.eye(d, dtype=torch.float64) if variant == "fold" else None
        rotate_model(model, get_arch(model), variant if variant != "fold" else "hadamard", seed, eye)
    x = test_windows(tok, seqlen=512, max_windows=1)[:1]
    with torch.no_grad():
        rel = float((base(x).logits - model(x).logits).norm() / base(x).logits.norm())
    log.info("%s: logits relative difference to the original %.2e", variant, rel)
    if rel > 1e-4:
        raise SystemExit(f"{variant}: the transformed model differs from the original ({rel:.2e})")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_row(folder: Path, row: str, out: Path, nsamples: int, seqlen: int) -> dict:
    from quantkit.api import quantize

    method, scheme, options = parse_row(row)
    t0, c0 = time.perf_counter(), cpu_s()
    summary = quantize(str(folder), method, out, scheme=scheme, options=dict(options), device="cpu", force=True,
                       calib={"dataset": "wiki-vital", "nsamples": nsamples, "seqlen": seqlen, "seed": 0})
    return {"quant_wall_s": time.perf_counter() - t0, "quant_cpu_s": cpu_s() - c0, "size_bytes": summary["size_bytes"]}


def score(model_name: str, folder: Path, windows: int) -> dict:
    import quantkit
    from quantkit.calib.data import test_windows
    from quantkit.eval.quality import evaluate
    from quantkit.models.sources import load_model, resolve

    base, tok = load_model(resolve(model_name), torch.float32)
    model = quantkit.load(str(folder), dtype=torch.float32, kernel="reference")
    q = evaluate([model], test_windows(tok, seqlen=512, max_windows=windows), base=base)[0]
    return {"ppl": q.ppl, "kl": q.kl, "top1": q.top1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="rtn-w4g64,gptq-w4g64")
    ap.add_argument("--variants", default="none,fold,hadamard", help="none, fold (norms only), hadamard, random")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantkit-rotation"))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    for variant in a.variants.split(","):
        folder = build(a.model, variant, a.work, a.seed)
        for row in a.rows.split(","):
            ckpt = a.work / f"{a.model}-{variant}-{row}"
            rec = {"model": a.model, "variant": variant, "row": row, "tag": a.tag, "windows": a.windows,
                   **run_row(folder, row, ckpt, a.nsamples, a.seqlen), **score(a.model, ckpt, a.windows),
                   "peak_rss_mib": peak_mib()}
            log.info("%s", rec)
            with (ROOT / "benchmarks" / "results" / "rotation.jsonl").open("a") as fh:
                fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
