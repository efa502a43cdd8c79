"""W8A8 / FP8 benchmark (not a test): quantkit's 8-bit weight-and-activation rows on a real model, under the peers'
protocol (/work/shared/peers/README.md), with the W8A8 CPU kernel's speed against the fp32 base in the same run.

Protocol: 64 calibration windows x 512 tokens of wiki-vital's calibration part (random.Random(0)); evaluation on the
first 40 non-overlapping 512-token windows of the test text, KL(base || model) over the full vocabulary, top-1
agreement, ppl = exp(mean NLL), fp32. Quality is scored on the checkpoint's exact maths: `quantkit.load(...,
kernel="dense")`, whose Linears quantize their input activations exactly as the checkpoint says (per token, or with
the calibrated static scale) before the dequantized weight multiplies them. Every quantization runs in its own
subprocess (its wall time, CPU time and peak RSS are its own). Speed: one process loads the fp32 base and each
checkpoint on its served kernels (`kernel="auto"`: w8a8-int8 for int8 rows, dense/dequantized for FP8 on a CPU) and
times them interleaved, median of the repeats: prefill = tokens/s of one forward over a batch of prompts, decode =
tokens/s of greedy generation with the KV cache, batch 1.

    .venv/bin/python benchmarks/w8a8.py                                  # smollm2-135m, default rows
    .venv/bin/python benchmarks/w8a8.py --rows w8a8-smoothquant,fp8dyn-rtn --model gemma3-270m
    .venv/bin/python benchmarks/w8a8.py --model gemma3-270m --peers llmc-w8a8,llmc-fp8dyn --threads 1

`--peers`: llm-compressor's rows (benchmarks/peers/llmc_w8a8.py), each quantized in its own .venv-llmc process
(`make venv-llmc`) on the same calibration windows, its compressed-tensors checkpoint then scored and timed by the
same children as quantkit's rows. `--keep DIR --reuse`: a row whose checkpoint and figures are already in DIR is
not quantized again (several invocations can share the quantize work, one scores them all).

Rows are PRESET-METHOD (see ROWS). The Markdown table goes to benchmarks/results/w8a8[-TAG].md, one JSON line per
row and run to benchmarks/results/w8a8.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _proc import peak_mib, cpu_s  # benchmarks/_proc.py
from w8a8_table import CONTEXT, LLMC_ROWS, markdown, peers  # benchmarks/w8a8_table.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("bench.w8a8")

ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {  # row -> (method, preset, options)
    "w8a8-rtn": ("rtn", "w8a8", {}),
    "w8a8-gptq": ("gptq", "w8a8", {}),
    "w8a8-smoothquant": ("smoothquant", "w8a8", {}),
    "w8a8-smoothquant-rtn": ("smoothquant-rtn", "w8a8", {}),
    # levers of the smoothing compositions' cost (session 11): float32 calibration (the default before), fewer α
    "w8a8-smoothquant-f32": ("smoothquant", "w8a8", {"calib_dtype": "float32"}),
    "w8a8-smoothquant-rtn-f32": ("smoothquant-rtn", "w8a8", {"calib_dtype": "float32"}),
    "w8a8-smoothquant-rtn-a4": ("smoothquant-rtn", "w8a8", {"alpha_grid": 4}),
    "fp8dyn-smoothquant-rtn": ("smoothquant-rtn", "fp8-dynamic", {}),
    "w8a8static-smoothquant": ("smoothquant", "w8a8-static", {}),
    "fp8dyn-rtn": ("rtn", "fp8-dynamic", {}),
    "fp8dyn-gptq": ("gptq", "fp8-dynamic", {}),
    # the FP8 weight scales at max|w| / 448 (llm-compressor's; fp8-dynamic's default before session 14)
    "fp8dyn-rtn-minmax": ("rtn", "fp8-dynamic", {}),
    "fp8dyn-gptq-minmax": ("gptq", "fp8-dynamic", {}),
    "fp8-gptq": ("gptq", "fp8", {}),
    # ROW-kv: the same row with an FP8 KV cache (--kv-cache fp8: per-layer k/v scales calibrated on the quantized model)
    "fp8dyn-rtn-kv": ("rtn", "fp8-dynamic", {}),
    "fp8dyn-rtn-minmax-kv": ("rtn", "fp8-dynamic", {}),
    "w8a8-rtn-kv": ("rtn", "w8a8", {}),
    "w8a8-smoothquant-rtn-kv": ("smoothquant-rtn", "w8a8", {}),
    "int8-bnb": ("int8", "", {}),  # bitsandbytes LLM.int8 (weights only, fp16 outliers): the method's own grid
}
SCHEME_FIELDS: dict[str, dict[str, Any]] = {  # row -> scheme fields over its preset's
    "fp8dyn-rtn-minmax": {"observer": "minmax"},
    "fp8dyn-rtn-minmax-kv": {"observer": "minmax"},
    "fp8dyn-gptq-minmax": {"observer": "minmax"},
}
LLMC_PY = ROOT / ".venv-llmc" / "bin" / "python"
LLMC_SCRIPT = ROOT / "benchmarks" / "peers" / "llmc_w8a8.py"
DEFAULT_ROWS = "w8a8-smoothquant,w8a8-gptq,w8a8-rtn,fp8dyn-rtn,fp8dyn-gptq"


# ------------------------------------------------------------------------------------------- children
def child_quantize(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    from quantkit.api import quantize

    from quantkit.scheme import make_scheme

    method, preset, options = ROWS[a.child]
    scheme = (make_scheme(preset, kv_cache="fp8" if a.child.endswith("-kv") else None, **SCHEME_FIELDS.get(a.child, {}))
              if preset else None)
    summary = quantize(a.model, method, a.child_out, scheme=scheme, options=options, device="cpu",
                       calib={"dataset": "wiki-vital", "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": 0})
    return {"quant_s": summary["quantize_seconds"], "process_s": time.perf_counter() - t0, "cpu_s": cpu_s(),
            "peak_rss_mib": peak_mib(), "size_bytes": summary["size_bytes"]}


def child_score(a: argparse.Namespace) -> dict[str, Any]:
    """ppl, KL, top-1 of every checkpoint (comma list) against the base, all on the same windows, by quantkit's own
    evaluator (`quantkit eval`: exact maths, one checkpoint in memory at a time). The base's log-probs are spilled
    (fp16) under --score-cache once and read back by every later score child of the same protocol, so several
    children can score checkpoints side by side after one base pass (an empty --child-out runs only that pass)."""
    import torch

    torch.set_num_threads(a.threads)
    from quantkit.eval.runner import evaluate_paths

    folders = [f for f in a.child_out.split(",") if f]
    res = evaluate_paths(folders, base=a.model, seqlen=512, max_windows=a.windows, device="cpu", kernel="dense",
                         cache_root=a.score_cache)
    base, rows = res["rows"][0], res["rows"][1:]
    out: dict[str, Any] = {"base": {"ppl": base["ppl"]}}
    for f, r in zip(folders, rows):
        if r.get("error"):
            raise SystemExit(f"{f}: {r['error']}")
        out[f] = {"ppl": r["ppl"], "kl": r["kl"], "top1": r["top1"], "scored_with": r.get("scored_with")}
        score_file(a, f).write_text(json.dumps({**out[f], "base_ppl": base["ppl"]}))  # for --reuse
    return out


def score_file(a: argparse.Namespace, folder: str) -> Path:
    return Path(f"{folder}.score-{a.model}-w{a.windows}.json")


def _is_bnb(folder: str) -> bool:
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "bitsandbytes"


def cache_figures(out: str) -> dict[str, Any]:
    """KV-cache bytes per token (as an engine stores the cache: fp8 = 1 byte, else fp16) and the stored weights."""
    sys.path.insert(0, str(ROOT))
    from quantkit.eval.describe import kv_cache_bytes, tensor_bytes

    cfg = json.loads((Path(out) / "config.json").read_text())
    kv = kv_cache_bytes(cfg, cfg.get("quantization_config"))
    weights = tensor_bytes(Path(out))
    return {"kv_bytes_per_token": kv, "weights_bytes": weights, "context_bytes": weights + kv * CONTEXT}


def same_weights(a: str, b: str) -> bool:
    """Every tensor of `a` is in `b` with the same bytes (b may add the KV-cache scales)."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    extra = {k for k in tb if k.endswith((".k_scale", ".v_scale"))}
    return set(tb) - extra == set(ta) and all(ta[k].dtype == tb[k].dtype and ta[k].view(-1).view(__import__("torch").uint8)
                                              .equal(tb[k].view(-1).view(__import__("torch").uint8)) for k in ta)


def _prefill(model, ids) -> float:
    import torch

    with torch.no_grad():
        t = time.perf_counter()
        model(ids, use_cache=False)
        return ids.numel() / (time.perf_counter() - t)


def _decode(model, prompt, new: int) -> float:
    import torch

    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return new / (time.perf_counter() - t)


def child_speed(a: argparse.Namespace) -> dict[str, Any]:
    """Prefill and decode tokens/s of the base and each checkpoint on its served kernels, interleaved."""
    import torch

    torch.set_num_threads(a.threads)
    import quantkit
    from quantkit.kernels import kernels_used
    from quantkit.models.sources import load_model, resolve

    base, _ = load_model(resolve(a.model), torch.float32)
    names = ["base"] + [f for f in a.child_out.split(",") if f]
    models = {"base": base.eval()}
    kernels = {"base": "fp32"}
    for f in names[1:]:
        models[f] = quantkit.load(f, dtype=torch.float32, **({} if _is_bnb(f) else {"kernel": "auto"})).eval()
        kernels[f] = ",".join(sorted(kernels_used(models[f])))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (a.prefill_batch, a.prefill_len), generator=gen)
    prompt = ids[:1, :64]
    pre: dict[str, list[float]] = {n: [] for n in names}
    dec: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        _prefill(models[n], ids[:, :32])
        _decode(models[n], prompt, 4)
    for _ in range(a.repeats):
        for n in names:
            pre[n].append(_prefill(models[n], ids))
            dec[n].append(_decode(models[n], prompt, a.decode_tokens))
    return {n: {"prefill_tps": statistics.median(pre[n]), "decode_tps": statistics.median(dec[n]),
                "kernels": kernels[n]} for n in names}


def spawn(args: list[str], cmd: list[str] | None = None) -> dict[str, Any]:
    cmd = cmd or [sys.executable, __file__, *args]
    log.info("running %s", " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT, env=env)
    if res.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed with exit code {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def quantize_row(a: argparse.Namespace, row: str, out: str, common: list[str]) -> dict[str, Any]:
    """Quantize one row in its own process (llm-compressor's in .venv-llmc); with --reuse, read a finished one."""
    done = Path(out + ".bench.json")
    if a.reuse and done.is_file() and Path(out).is_dir():
        log.info("%s: reusing %s", row, out)
        return json.loads(done.read_text())
    if row in LLMC_ROWS:
        if not LLMC_PY.is_file():
            raise SystemExit(f"--peers {row} needs {LLMC_PY}: run `make venv-llmc` first")
        r = {"library": "llm-compressor 0.14.0.1", **spawn([], [str(LLMC_PY), str(LLMC_SCRIPT), "--row", row,
             "--model", a.model, "--out", out, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
             "--threads", str(a.threads)])}
    elif row in ROWS:
        r = {"library": "quantkit", **spawn(["--child", row, "--child-kind", "quantize", "--child-out", out, *common])}
    else:
        raise SystemExit(f"unknown row {row}: one of {', '.join([*ROWS, *LLMC_ROWS])}")
    done.write_text(json.dumps(r))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-speed", action="store_true", help="skip the speed child (quality and cache rows only)")
    ap.add_argument("--score-cache", type=Path, help="where the base's log-probs are spilled (default: KEEP/eval-cache)")
    ap.add_argument("--speed-rows", default="", help="time only these rows (comma list; default: every row)")
    ap.add_argument("--total-minutes", type=float, default=0.0, help="with --render: the run's total time")
    ap.add_argument("--keep", type=Path, help="keep the checkpoints in this folder (default: a temporary one)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--peers", default="", help=f"comma list of llm-compressor rows ({', '.join(LLMC_ROWS)}); "
                    "needs .venv-llmc (make venv-llmc)")
    ap.add_argument("--reuse", action="store_true", help="with --keep: skip rows already quantized there")
    ap.add_argument("--quantize-only", action="store_true", help="stop after the quantize children (for --reuse)")
    ap.add_argument("--render", metavar="WHEN", help="only rewrite the Markdown of the run stamped WHEN in w8a8.jsonl")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-kind", choices=["quantize", "score", "speed"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.child_kind:
        fn = {"quantize": child_quantize, "score": child_score, "speed": child_speed}[a.child_kind]
        print(json.dumps(fn(a)))
        return
    if a.render:
        lines = [json.loads(x) for x in (RESULTS / "w8a8.jsonl").read_text().splitlines() if x.strip()]
        run = [x for x in lines if x["when"] == a.render and x["model"] == a.model]
        base = next(x for x in run if x["row"] == "fp32 base")
        rows = [x for x in run if x["row"] != "fp32 base"]
        text = markdown(rows + peers(a), base, a, a.total_minutes * 60)
        (RESULTS / f"w8a8{'-' + a.tag if a.tag else ''}.md").write_text(text)
        print(text)
        return
    t0 = time.perf_counter()
    common = ["--model", a.model, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--windows",
              str(a.windows), "--threads", str(a.threads), "--prefill-batch", str(a.prefill_batch), "--prefill-len",
              str(a.prefill_len), "--decode-tokens", str(a.decode_tokens), "--repeats", str(a.repeats)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quantkit-bench-w8a8-") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for row in [r for r in a.rows.split(",") if r] + [p for p in a.peers.split(",") if p]:
            out = str(work / row)
            rows.append({"row": row, "out": out, **quantize_row(a, row, out, common), **cache_figures(out)})
            plain = work / row.removesuffix("-kv")
            if row.endswith("-kv") and plain.is_dir():
                rows[-1]["same_weights"] = same_weights(str(plain), out)
            log.info("%s: %s", row, rows[-1])
        if a.quantize_only:
            return
        outs = ",".join(r["out"] for r in rows)
        todo = ",".join(r["out"] for r in rows if not (a.reuse and score_file(a, r["out"]).is_file()))
        cache = ["--score-cache", str(a.score_cache or work / "eval-cache")]
        scores = spawn(["--child", "all", "--child-kind", "score", "--child-out", todo, *cache, *common]) if todo else {}
        for r in rows:  # scored before (--reuse), by an earlier or a parallel score child on the same windows
            if r["out"] not in scores:
                done = json.loads(score_file(a, r["out"]).read_text())
                scores["base"] = {"ppl": done.pop("base_ppl")}
                scores[r["out"]] = done
        timed = ",".join(r["out"] for r in rows if not a.speed_rows or r["row"] in a.speed_rows.split(","))
        speeds = {} if a.no_speed else spawn(["--child", "all", "--child-kind", "speed", "--child-out", timed, *common])
    for r in rows:
        r.update(scores[r["out"]])
        r.update(speeds.get(r["out"], {}))
    base = {**scores["base"], **speeds.get("base", {})}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    with (RESULTS / "w8a8.jsonl").open("a") as fh:
        fh.write(json.dumps({"when": stamp, "model": a.model, "row": "fp32 base", **base}) + "\n")
        for r in rows:
            fh.write(json.dumps({"when": stamp, "model": a.model, **{k: v for k, v in r.items() if k != "out"}}) + "\n")
    text = markdown(rows + peers(a), base, a, time.perf_counter() - t0)
    (RESULTS / f"w8a8{'-' + a.tag if a.tag else ''}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
