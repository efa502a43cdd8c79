"""GPTQ benchmark on smollm2-135m (not a test): RTN vs quantkit GPTQ (vs GPTQModel when importable).

Protocol (as /work/shared/peers): 64 calibration windows x 512 tokens drawn with random.Random(0) from
wiki-vital's calibration part; evaluation on the first 40 non-overlapping 512-token windows of the test
text; KL(base || quantized) on the full vocabulary. Every quantization runs in its own subprocess so its
wall time and peak RSS (VmHWM) are its own. Then the disk-offload memory demonstration on tiny random
Llamas of 4, 16 and 64 layers. Writes a markdown table (default benchmarks/results/gptq.md).

    .venv/bin/python benchmarks/gptq.py                     # quantkit only (GPTQModel if .venv-interop exists)
    .venv/bin/python benchmarks/gptq.py --settings w4g64 --no-offload-demo
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import peak_mib, cpu_s  # benchmarks/_proc.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny builds the offload demo's random models
MODEL = "smollm2-135m"
log = logging.getLogger("bench.gptq")






def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# quantkit GPTQ rows: label -> method options (gptq: the defaults)
LIBRARY_OPTIONS: dict[str, dict[str, str]] = {
    "gptq": {},
    "gptq-fp32": {"calib_dtype": "float32", "hessian_products": "float32"},   # the default until session 9
    "gptq-bf16": {"calib_dtype": "bfloat16"},
    "gptq-bf16-fp32h": {"calib_dtype": "bfloat16", "hessian_products": "float32"},
}


# ----------------------------------------------------------------------------------------- children
def child_quantkit(a: argparse.Namespace) -> dict:
    from quantkit.api import quantize
    from quantkit.scheme import PRESETS

    t0 = time.perf_counter()
    options = json.loads(a.options) if a.method == "gptq" and a.options else None
    s = quantize(MODEL, a.method, a.out, scheme=dict(PRESETS[a.preset]), device="cpu", force=True,
                 calib={"nsamples": a.nsamples, "seqlen": a.seqlen, "batch_size": 8}, options=options)
    return {"quant_s": s["quantize_seconds"], "process_s": time.perf_counter() - t0, "peak_mib": peak_mib(),
            "cpu_s": cpu_s()}


def child_gptqmodel(a: argparse.Namespace) -> dict:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from quantkit.models.sources import resolve
    from quantkit.scheme import PRESETS

    t0 = time.perf_counter()
    samples = torch.load(a.samples, weights_only=True)  # (n, T) int64: the exact windows quantkit used
    p = PRESETS[a.preset]
    qcfg = QuantizeConfig(bits=p["bits"], group_size=p["group_size"], sym=False, desc_act=False, damp_percent=0.01)
    model = GPTQModel.load(resolve(MODEL).path, qcfg, device="cpu")
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in samples]
    t1 = time.perf_counter()
    model.quantize(calib, batch_size=8)
    quant_s = time.perf_counter() - t1
    model.save(a.out)
    return {"quant_s": quant_s, "process_s": time.perf_counter() - t0, "peak_mib": peak_mib(), "cpu_s": cpu_s()}


def child_offload(a: argparse.Namespace) -> dict:
    """Quantize a tiny random Llama of `a.layers` layers with GPTQ, offload `a.offload`; RSS figures in MiB."""
    from quantkit.api import quantize
    from tests.tiny import llama_config, make_model, write_text

    tmp = Path(a.out)
    folder = tmp / f"llama{a.layers}"
    if not (folder / "config.json").is_file():  # the parent builds it; a child never writes the model twice
        make_model(folder, llama_config(layers=a.layers, hidden=a.hidden, inter=3 * a.hidden))
    text = write_text(tmp / "calib.txt")
    before = _rss_mib()
    t0 = time.perf_counter()
    quantize(folder, "gptq", tmp / f"q{a.layers}-{a.offload}", scheme="w4g64", device="cpu", force=True,
             calib={"dataset": str(text), "nsamples": 8, "seqlen": 128, "batch_size": 4},
             options={"offload": a.offload})
    block_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / a.layers / 2**20
    return {"before_mib": before, "peak_mib": peak_mib(), "seconds": time.perf_counter() - t0,
            "block_mib": block_mib}


def child_main(a: argparse.Namespace) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch

    torch.set_num_threads(a.threads)
    fn = {"quantkit": child_quantkit, "gptqmodel": child_gptqmodel, "offload": child_offload}[a.child]
    Path(a.result).write_text(json.dumps(fn(a)))


# ------------------------------------------------------------------------------------------- parent
def _interop_python() -> str | None:
    if importlib.util.find_spec("gptqmodel") is not None:
        return sys.executable
    venv = ROOT / ".venv-interop" / "bin" / "python"
    if venv.is_file() and subprocess.run([str(venv), "-c", "import gptqmodel"], capture_output=True,
                                         env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}).returncode == 0:
        return str(venv)
    return None


def _spawn(python: str, args: list[str], tmp: Path, name: str) -> dict | None:
    result = tmp / f"{name}.json"
    logf = tmp / f"{name}.log"
    cmd = [python, str(Path(__file__).resolve()), *args, "--result", str(result)]
    log.info("running %s (log: %s)", name, logf)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPTQMODEL_CPU_WORKERS": "2", "TQDM_DISABLE": "1"}
    with open(logf, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0 or not result.is_file():
        log.error("%s failed (exit %d); last lines:\n%s", name, rc, "\n".join(logf.read_text().splitlines()[-15:]))
        return None
    return json.loads(result.read_text())


def quality_runs(a: argparse.Namespace, tmp: Path) -> list[dict]:
    import torch

    import quantkit
    from quantkit.calib.data import calibration_samples, test_windows
    from quantkit.eval.quality import evaluate
    from quantkit.models.sources import load_model, resolve

    base, tok = load_model(resolve(MODEL))
    samples = calibration_samples(tok, nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    torch.save(samples, tmp / "samples.pt")
    peer_py = _interop_python() if a.peers else None
    if a.peers and peer_py is None:
        log.warning("gptqmodel is not importable here nor in .venv-interop: GPTQModel rows skipped")
    common = ["--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--threads", str(a.threads)]
    rows: list[dict] = []
    for preset in a.settings:
        # (label, python, child kind, method, extra child args)
        runs = [(lib, sys.executable, "quantkit", "rtn" if lib == "rtn" else "gptq",
                 ["--options", json.dumps(LIBRARY_OPTIONS[lib])] if LIBRARY_OPTIONS.get(lib) else [])
                for lib in a.libraries if lib != "gptqmodel"]
        if peer_py and "gptqmodel" in a.libraries:
            runs.append(("gptqmodel", peer_py, "gptqmodel", "gptq", []))
        for label, py, kind, method, extra in runs:
            out = tmp / f"{label}-{preset}"
            args = ["--child", kind, "--method", method, "--preset", preset, "--out", str(out),
                    "--samples", str(tmp / "samples.pt"), *common, *extra]
            res = _spawn(py, args, tmp, f"{label}-{preset}")
            rows.append({"setting": preset, "library": label, "out": out, **(res or {"failed": True})})
    ok = [r for r in rows if not r.get("failed")]
    if a.windows > 0:  # --windows 0: time and memory only
        windows = test_windows(tok, seqlen=512, max_windows=a.windows)
        models = [quantkit.load(r["out"], kernel="dense") for r in ok]  # exact, dequantized once
        log.info("evaluating %d models on %d windows", len(models), len(windows))
        for r, q in zip(ok, evaluate(models, windows, base=base)):
            r.update(ppl=q.ppl, kl=q.kl, top1=q.top1)
    if a.keep:
        import shutil

        for r in ok:
            if r["library"] != "gptqmodel":
                shutil.copytree(r["out"], a.keep / f"{r['library']}-{r['setting']}", dirs_exist_ok=True)
    return rows


def offload_runs(a: argparse.Namespace, tmp: Path) -> list[dict]:
    from tests.tiny import llama_config, make_model

    rows = []
    for layers in a.depths:
        make_model(tmp / f"llama{layers}", llama_config(layers=layers, hidden=a.hidden, inter=3 * a.hidden))
        for mode in ("none", "disk"):
            res = _spawn(sys.executable, ["--child", "offload", "--layers", str(layers), "--offload", mode,
                                          "--hidden", str(a.hidden), "--out", str(tmp), "--threads", str(a.threads)],
                         tmp, f"off{layers}-{mode}")
            rows.append({"layers": layers, "offload": mode, **(res or {"failed": True})})
    return rows


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(a: argparse.Namespace, rows: list[dict], off: list[dict]) -> str:
    lines = [f"# GPTQ on {MODEL}", "",
             f"Calibration: wiki-vital, {a.nsamples} x {a.seqlen} tokens (random.Random(0)); evaluation: first "
             f"{a.windows} test windows of 512 tokens; fp32 CPU, {a.threads} threads; asymmetric, no act-order.",
             "Each quantization ran in its own process: `quant s` is the quantize call, `process s` includes "
             "model load and save, `CPU s` its user+system CPU time (what a busy machine cannot inflate much), "
             "`peak RSS` its VmHWM.", "",
             "| setting | library | quant s | process s | CPU s | peak RSS MiB | ppl | KL | top-1 % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['setting']} | {r['library']} | FAILED (see the log) |||||||")
            continue
        lines.append(f"| {r['setting']} | {r['library']} | {r['quant_s']:.1f} | {r['process_s']:.1f} | "
                     f"{_f(r.get('cpu_s'), '.0f')} | {r['peak_mib']:.0f} | {_f(r.get('ppl'), '.3f')} | {_f(r.get('kl'), '.4f')} | "
                     f"{_f(r.get('top1'), '.2f')} |")
    by = {(r["setting"], r["library"]): r for r in rows if not r.get("failed")}
    notes = []
    for preset in a.settings:
        rt, pm = by.get((preset, "rtn")), by.get((preset, "gptqmodel"))
        for lib in (k for k in LIBRARY_OPTIONS if k in a.libraries):
            g = by.get((preset, lib))
            if g and rt and "kl" in g:
                notes.append(f"- {preset} {lib}: GPTQ/RTN KL {g['kl'] / rt['kl']:.3f}, ppl {g['ppl'] / rt['ppl']:.3f}")
            if g and pm and "ppl" in pm:
                notes.append(f"- {preset} {lib}: quantkit/GPTQModel time {g['quant_s'] / pm['quant_s']:.3f}, "
                             f"KL {g['kl'] / pm['kl']:.3f}, "
                             f"CPU s {g['cpu_s'] / pm['cpu_s']:.3f}, ppl {g['ppl'] / pm['ppl']:.3f}, "
                             f"peak RSS {g['peak_mib'] / pm['peak_mib']:.3f}")
    if notes:
        lines += ["", "Ratios:", *notes]
    if off:
        lines += ["", f"## Disk offload: peak RSS vs depth (tiny random Llama, hidden {a.hidden}, w4g64, GPTQ)", "",
                  "`peak - start` is the growth of the quantizing process over its RSS just before `quantize`.", "",
                  "| layers | offload | block MiB | model MiB | s | RSS at start MiB | peak RSS MiB | peak - start MiB |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in off:
            if r.get("failed"):
                lines.append(f"| {r['layers']} | {r['offload']} | FAILED |||||")
                continue
            lines.append(f"| {r['layers']} | {r['offload']} | {r['block_mib']:.1f} | {r['block_mib'] * r['layers']:.0f} | "
                         f"{r['seconds']:.1f} | {r['before_mib']:.0f} | {r['peak_mib']:.0f} | "
                         f"{r['peak_mib'] - r['before_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", type=lambda s: s.split(","), default=["w4g64", "w3g64"])
    ap.add_argument("--libraries", type=lambda s: s.split(","), default=["rtn", "gptq", "gptq-fp32", "gptqmodel"],
                    help="rows: rtn, gptqmodel, and quantkit GPTQ with its defaults (gptq) or with the options "
                         "of LIBRARY_OPTIONS: " + ", ".join(k for k in LIBRARY_OPTIONS if k != "gptq"))
    ap.add_argument("--options", help=argparse.SUPPRESS)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--offload-demo", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64])
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the offload demo's tiny Llamas")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gptq.md")
    ap.add_argument("--keep", type=Path, help="copy quantkit's checkpoints here (gptq-w4g64, ...), e.g. for the demo")
    # child-process arguments
    ap.add_argument("--child", choices=["quantkit", "gptqmodel", "offload"])
    ap.add_argument("--method"), ap.add_argument("--preset"), ap.add_argument("--samples")
    ap.add_argument("--result"), ap.add_argument("--layers", type=int), ap.add_argument("--offload")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.child:
        a.out = str(a.out)
        child_main(a)
        return
    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="quantkit-bench-gptq-") as t:
        tmp = Path(t)
        rows = quality_runs(a, tmp) if a.quality else []
        off = offload_runs(a, tmp) if a.offload_demo else []
        md = markdown(a, rows, off)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(md)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
