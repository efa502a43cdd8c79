"""One command that proves quantkit's CUDA paths on a GPU machine (the driver behind scripts/gpu-check.sh).

Steps, each timed and recorded (a failed step fails the run, the others still run):
1. environment: quantkit is imported from this tree; torch, transformers, the device;
2. models: a ~1B-shaped random Llama (TinyLlama's shapes) with a BPE tokenizer trained offline on the tree's
   Markdown, plus the built-in smollm2-135m where this machine has it;
3. kernels: every kernel of quantkit's registry that runs on the device, against the reference QuantLinear,
   on every Linear shape of those models (quantkit.kernels.KERNELS: kernels added later are covered);
4. per model: `quantkit quantize --device DEV` with RTN, GPTQ and AWQ (small calibration), then one
   `quantkit eval --speed --device DEV` of the base and every checkpoint, then each checkpoint's logits on
   kernel="auto" against the reference module;
5. one table (per method: quantize time, peak memory, ppl/KL, TTFT/TPS/throughput, kernel, max |Δlogit|),
   written as gpu-check.md and gpu-check.json into --out ($OUT, else gpu-out/), with gpu-check.log.
Exit code: 0 when everything passed, 1 on any failure or mismatch, 2 on bad arguments. Without CUDA (and
without --dry-run) it prints one line and exits 0. `--device cpu --dry-run`: the same steps on CPU, tiny models.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpucheck import build  # noqa: E402
from gpucheck.report import markdown, method_row, write_result  # noqa: E402
from gpucheck.steps import Budget, Steps, cli_env  # noqa: E402

ROOT = build.ROOT
NO_CUDA = ("gpu-check: no CUDA device on this machine, nothing checked "
           "(run it on a GPU machine; --device cpu --dry-run checks the plumbing here)")
SMOLLM2 = "smollm2-135m"
log = logging.getLogger("gpucheck")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="tiny models and calibration: the plumbing, on any device")
    ap.add_argument("--out", type=Path, default=None, help="where the table goes (default $OUT, else gpu-out/)")
    ap.add_argument("--work", type=Path, default=None,
                    help="models and checkpoints (default $GPU_CHECK_WORK, else a folder under the temp dir)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run; steps past it fail (default 450; dry run 300, for a busy CI machine)")
    ap.add_argument("--methods", default=None, help="comma-separated (default rtn,gptq,awq)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the random Llama (default 22; 2 dry)")
    ap.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=None,
                    help="also check smollm2-135m (default: where present, not in a dry run)")
    args = ap.parse_args(argv)
    if args.device.split(":")[0] not in ("cuda", "cpu"):
        ap.error(f"--device {args.device}: use cuda, cuda:N or cpu")
    if args.device == "cpu" and not args.dry_run:
        ap.error("--device cpu runs only with --dry-run (the ~1B model is sized for a GPU)")
    return args


def setup_logging(out: Path) -> list[logging.Handler]:
    """INFO and above to stderr and to OUT/gpu-check.log; returns the handlers (main removes them at its end)."""
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(out / "gpu-check.log", mode="w")]
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    logging.getLogger("quantkit").setLevel(logging.WARNING)  # the in-process loads' "kernels: ..." lines
    return handlers


def profile_for(args: argparse.Namespace) -> build.Profile:
    import dataclasses

    prof = build.DRY if args.dry_run else build.GPU
    changes = {}
    if args.layers:
        changes["llama"] = {**prof.llama, "num_hidden_layers": args.layers}
    if args.methods:
        changes["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return dataclasses.replace(prof, **changes) if changes else prof


def environment(device: torch.device) -> dict:
    import quantkit
    import transformers
    from quantkit.eval.hardware import device_name

    where = Path(quantkit.__file__).resolve()
    if ROOT not in where.parents:
        raise RuntimeError(f"quantkit is imported from {where}, not from this tree ({ROOT})")
    return {"quantkit": quantkit.__version__, "quantkit_path": str(where.parent), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "device_name": device_name(device),
            "cuda": torch.version.cuda, "capability": ".".join(map(str, torch.cuda.get_device_capability(device)))
            if device.type == "cuda" else None}


def quantkit_cmd() -> list[str]:
    """The console script of the interpreter running this (the venv gpu-check.sh made), as a user runs it."""
    script = Path(sys.executable).parent / "quantkit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "quantkit"]


def find_models(steps: Steps, args: argparse.Namespace, prof: build.Profile, work: Path, corpus: Path,
                device: torch.device) -> dict[str, tuple[Path, dict]]:
    """{label: (folder, config.json)} of the models the run checks."""
    import json

    models: dict[str, tuple[Path, dict]] = {}
    folder = work / "models" / f"{prof.name}-{prof.llama['num_hidden_layers']}l"

    def make() -> None:
        if not (folder / "config.json").is_file():  # deterministic: a rerun reuses it
            folder.parent.mkdir(parents=True, exist_ok=True)
            build.build_llama(folder, prof, corpus.read_text(encoding="utf-8"), device)
        models[prof.name] = (folder, json.loads((folder / "config.json").read_text()))

    steps.call(f"build {prof.name}", make)
    if args.smollm2 if args.smollm2 is not None else not args.dry_run:
        from quantkit.errors import QuantkitError
        from quantkit.models.sources import read_config, resolve

        t0 = time.perf_counter()
        try:
            src = resolve(SMOLLM2)
        except QuantkitError as e:
            log.info("%s is not on this machine, skipped: %s", SMOLLM2, str(e).splitlines()[0])
            if args.smollm2:  # asked for by name: its absence fails the run
                steps.add(f"find {SMOLLM2}", False, time.perf_counter() - t0, str(e).splitlines()[0])
        else:
            models[SMOLLM2] = (Path(src.path), read_config(Path(src.path)))
            steps.add(f"find {SMOLLM2}", True, time.perf_counter() - t0, src.path)
    return models


def check_kernels(steps: Steps, models: dict[str, tuple[Path, dict]], device: torch.device) -> tuple[list, list]:
    from gpucheck import kernelcheck

    shapes = list(dict.fromkeys(s for _, cfg in models.values() for s in build.linear_shapes(cfg)))
    summaries = steps.call("kernels vs reference", lambda: kernelcheck.check_kernels(shapes, device)) or []
    for s in summaries:
        if s.status == "FAIL":
            steps.extra.append(f"kernel {s.kernel}: {len(s.failures)} case(s) off: {s.failures[0]}")
    fast = [s for s in summaries if s.kernel != "dense" and s.served]
    if summaries and not fast:
        why = "; ".join(f"{s.kernel}: {s.status} {s.note}" for s in summaries)
        steps.extra.append(f"no fast kernel served any case on {device}: {why}")
    return kernelcheck.summaries_json(summaries), shapes


def check_model(steps: Steps, label: str, folder: Path, config: dict, prof: build.Profile, corpus: Path,
                work: Path, device: torch.device, eval_dtype: torch.dtype) -> list[dict]:
    """quantize x methods, one eval of the base and the checkpoints, the logit checks: this model's rows."""
    from gpucheck.kernelcheck import logit_check

    preset = build.preset_for(build.linear_shapes(config), prof.preset)

    ckdir = work / "checkpoints" / label
    ckdir.mkdir(parents=True, exist_ok=True)
    calib = ["--dataset", str(corpus), "--nsamples", str(prof.nsamples), "--seqlen", str(prof.seqlen),
             "--batch-size", str(prof.calib_batch)]
    quants: dict[str, dict | None] = {}
    for method in prof.methods:
        ck = ckdir / method
        quants[method] = steps.cli(f"{label} quantize {method}", [
            "quantize", str(folder), "--method", method, "--preset", preset, "--device", str(device),
            *calib, "--out", str(ck), "--force", "--quiet", "--json", str(ckdir / f"{method}.json")],
            json_out=ckdir / f"{method}.json")
    made = [m for m in prof.methods if quants[m] is not None]
    ev_json = ckdir / "eval.json"
    ev = steps.cli(f"{label} eval --speed", [
        "eval", *[str(ckdir / m) for m in made], "--base", str(folder), "--dataset", str(corpus),
        "--seqlen", str(prof.eval_seqlen), "--max-windows", str(prof.eval_windows), "--speed",
        "--prompt-len", str(prof.prompt_len), "--gen-tokens", str(prof.gen_tokens), "--batch", str(prof.speed_batch),
        "--repeats", str(prof.repeats), "--device", str(device), "--kernel", "auto", "--no-cache", "--quiet",
        "--json", str(ev_json)], json_out=ev_json)
    evrows = {r["model"]: r for r in (ev or {}).get("rows", [])}
    rows = []
    base = evrows.get(str(folder))
    rows.append(method_row(label, f"base ({str(eval_dtype).removeprefix('torch.')})", "—", None, base, None,
                           _row_failures(base, None, ev is not None)))
    for method in prof.methods:
        path = ckdir / method
        logits = None
        if quants[method] is not None:
            logits = steps.call(f"{label} {method} logits auto vs reference",
                                lambda p=path: logit_check(p, device, eval_dtype, prof.logit_tokens))
        evrow = evrows.get(str(path))
        failed = [] if quants[method] is not None else ["quantize failed"]
        failed += _row_failures(evrow, logits, ev is not None and quants[method] is not None)
        rows.append(method_row(label, method, preset, quants[method], evrow, logits, failed))
    return rows


def _row_failures(evrow: dict | None, logits: dict | None, expect_eval: bool) -> list[str]:
    failed = []
    if expect_eval and evrow is None:
        failed.append("no eval row")
    if evrow is not None:
        if evrow.get("error"):
            failed.append(f"eval: {evrow['error']}")
        for key in ("ppl", "tps", "ttft_ms", "throughput_tps"):
            value = evrow.get(key)
            if not evrow.get("error") and (value is None or value != value or value <= 0):
                failed.append(f"eval: {key} is {value}")
    if logits is not None and not logits["ok"]:
        failed.append(f"logits: rel Δ {logits['rel_dlogit']:.2e} >= {logits['tolerance']:g} on {logits['kernels']}")
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stdout.write(NO_CUDA + "\n")
        return 0
    t_start = time.perf_counter()
    out = (args.out or Path(os.environ.get("OUT") or ROOT / "gpu-out")).resolve()
    work = (args.work or Path(os.environ.get("GPU_CHECK_WORK") or Path(tempfile.gettempdir()) / "quantkit-gpu-check"))
    work = work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    handlers = setup_logging(out)
    try:
        return run(args, device, out, work, t_start)
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


def run(args: argparse.Namespace, device: torch.device, out: Path, work: Path, t_start: float) -> int:
    prof = profile_for(args)
    budget_s = args.budget if args.budget is not None else (300.0 if args.dry_run else 450.0)
    steps = Steps(Budget(budget_s), quantkit_cmd(), cli_env(work), work / "logs")
    log.info("gpu-check on %s, profile %s, budget %.0f s, work %s, out %s", device, prof.name, budget_s, work, out)

    env = steps.call("environment", lambda: environment(device)) or {}
    corpus = build.write_corpus(work / "corpus.txt")
    models = find_models(steps, args, prof, work, corpus, device)
    kernels, shapes = check_kernels(steps, models, device)
    from quantkit.eval.hardware import resolve_dtype

    eval_dtype = resolve_dtype(None, device)
    rows = []
    for label, (folder, config) in models.items():
        rows += check_model(steps, label, folder, config, prof, corpus, work, device, eval_dtype)
    row_failures = [f"{r['model']} {r['method']}: {'; '.join(r['failures'])}" for r in rows if r["failures"]]
    failures = steps.failures + steps.extra + row_failures
    from gpucheck.kernelcheck import SCHEMES, check_dtypes

    result = {
        "ok": not failures, "failures": failures, "device": str(device), "dry_run": args.dry_run,
        "environment": {"device_name": str(device), "torch": torch.__version__, "transformers": "?",
                        "quantkit": "?", **env},
        "profile": {k: v for k, v in prof.__dict__.items() if k != "extra"}, "models": list(models),
        "eval_dtype": str(eval_dtype).removeprefix("torch."), "rows": rows, "kernels": kernels,
        "kernel_shapes": shapes, "kernel_schemes": ", ".join(f"w{b}g{g}{'s' if s else 'a'}{'-act' if a else ''}"
                                                           for b, g, s, a in SCHEMES),
        "kernel_dtypes": ", ".join(str(d).removeprefix("torch.") for d in check_dtypes(device)),
        "steps": steps.to_json(), "budget_seconds": budget_s,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    for rec in steps.records:
        if not rec.ok and rec.log:
            tail = Path(rec.log).read_text(errors="replace").splitlines()[-40:]
            log.error("last lines of %s:\n%s", rec.log, "\n".join(tail))
    md, js = write_result(out, result)
    from rich.console import Console

    Console(markup=False, highlight=False, soft_wrap=True).print(markdown(result))
    log.info("%s in %.0f s; wrote %s and %s", "PASS" if result["ok"] else f"FAIL ({len(failures)})",
             result["wall_seconds"], md, js)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
