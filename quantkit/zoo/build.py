"""`quantkit zoo build`: plan (what changed), build what must be, gate, index.

Planning happens in the driver process: each entry's input fingerprint is computed
(base files' sha256, canonical recipe, calibration sample hash, quantkit version) and
compared with the one in `DIR/<name>/manifest.json`. An entry is rebuilt when it is
new, forced, incomplete (no manifest, or a file missing or of the wrong size) or any
input changed; everything else is left alone. Gates are checked on every build from
the manifests' metrics (changing a gate re-gates without rebuilding).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.zoo.config import Entry, load_zoo
from quantkit.zoo.entry import MANIFEST, STAGING, Task, is_complete, read_json, run_task
from quantkit.zoo.executors import make_executor
from quantkit.zoo.fingerprint import HashCache, Inputs, base_hashes, calibration_hash, changes, local_model
from quantkit.zoo.recipe import Gates

log = logging.getLogger(__name__)

HASH_CACHE = ".cache/file-hashes.json"


@dataclass
class Plan:
    entry: Entry
    task: Task
    reasons: list[str]            # empty: up to date


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    resumed: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    gate_failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors and not self.gate_failures

    def as_dict(self) -> dict[str, Any]:
        return {"built": self.built, "up_to_date": self.up_to_date, "resumed": self.resumed, "errors": self.errors,
                "gate_failures": self.gate_failures, "seconds": round(self.seconds, 3), "ok": self.ok}


def check_gates(gates: Gates, m: dict[str, Any]) -> list[str]:
    """One message per gate the metrics `m` fail (a missing metric fails its gate)."""
    fails = []
    if m.get("error"):
        return [f"evaluation failed: {m['error']}"]
    checks = (("max_ppl_increase_pct", "delta_ppl_pct", "Δppl", "%", lambda v, lim: v <= lim, ">"),
              ("max_kl", "kl", "KL", "", lambda v, lim: v <= lim, ">"),
              ("min_top1", "top1", "top-1", "%", lambda v, lim: v >= lim, "<"))
    for gate, key, label, unit, passes, op in checks:
        limit = getattr(gates, gate)
        if limit is None:
            continue
        value = m.get(key)
        if value is None:
            fails.append(f"{label} was not measured ({gate} {limit:g})")
        elif not passes(value, limit):
            fails.append(f"{label} {value:.4g}{unit} {op} {gate} {limit:g}{unit}")
    return fails


def _clean_stale(out: Path, names: set[str]) -> None:
    """Remove temp folders of killed renames and staging folders of entries no longer in the zoo."""
    for p in out.glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".*.old-*"):
        shutil.rmtree(p, ignore_errors=True)
    staging = out / STAGING
    if staging.is_dir():
        for p in staging.iterdir():
            if p.name not in names:
                shutil.rmtree(p, ignore_errors=True)
    for p in out.iterdir():
        if p.is_dir() and not p.name.startswith(".") and p.name not in names and (p / MANIFEST).exists():
            log.warning("%s is not in the zoo file any more; left in place, and out of the index", p)


def plan(entries: list[Entry], out: Path, force: list[str], device: str, zoo_name: str) -> list[Plan]:
    from quantkit.zoo.card import model_license

    cache = HashCache(out / HASH_CACHE)
    models: dict[str, tuple[Path, dict[str, str], str | None]] = {}
    calib: dict[tuple[str, str], str | None] = {}
    plans = []
    for e in entries:
        model = e.recipe.model or ""
        if model not in models:
            path, _ = local_model(model)
            models[model] = (path, base_hashes(path, cache), e.license or model_license(model, path))
        path, hashes, license_ = models[model]
        ckey = (model, e.recipe.calibration.model_dump_json())
        if e.recipe.needs_calibration() and ckey not in calib:
            calib[ckey] = calibration_hash(path, e.recipe)
        inputs = Inputs(base_files=hashes, recipe=e.recipe.canonical(),
                        calibration=calib[ckey] if e.recipe.needs_calibration() else None)
        folder = out / e.name
        manifest = read_json(folder / MANIFEST)
        reasons = changes(manifest.get("inputs") if manifest else None, inputs)
        if not reasons and not is_complete(folder):
            reasons = ["incomplete"]
        if e.name in force:
            reasons = ["forced"]
        if reasons == ["new"] and (out / STAGING / e.name).is_dir():
            reasons = ["resuming an interrupted build"]
        task = Task(name=e.name, recipe=e.recipe.model_dump(mode="json"), model_path=str(path), model=model,
                    out=str(out.resolve()), inputs=inputs.as_dict(), device=device,
                    card={"base_model": e.base_model, "license": license_, "model_name": e.model_name, "zoo": zoo_name})
        plans.append(Plan(e, task, reasons))
    cache.save()
    return plans


def build_zoo(zoo_file: str | Path, out: str | Path, force: list[str] | None = None, jobs: int = 1,
              executor: str = "local", device: str = "auto", ray_address: str | None = None,
              models: list[str] | None = None, say: Callable[[str], Any] | None = None) -> BuildReport:
    """Build every entry of `zoo_file` that changed into `out`, then gate and index the whole zoo.

    `models` keeps only the entries of those model names (one CI matrix job per model).
    """
    from quantkit.zoo.index import write_index

    say = say or log.info
    t0 = time.perf_counter()
    zoo_file, out = Path(zoo_file), Path(out)
    entries = load_zoo(zoo_file)
    if models:
        known = list(dict.fromkeys(e.model_name for e in entries))
        missing = [m for m in models if m not in known]
        if missing:
            raise QuantkitError(f"--model {missing[0]}: not in {zoo_file}; the models are: {', '.join(known)}")
        entries = [e for e in entries if e.model_name in models]
    names = [e.name for e in entries]
    unknown = [n for n in (force or []) if n not in names]
    if unknown:
        raise QuantkitError(f"--force {unknown[0]}: no such entry; the entries are: {', '.join(names)}")
    runner = make_executor(executor, jobs, ray_address)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _clean_stale(out, set(names))
        plans = plan(entries, out, force or [], device, zoo_file.stem)  # resolves every model first
    except BaseException:
        if created:  # nothing was built: a missing model leaves no empty -o folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    report = BuildReport()
    todo = [p for p in plans if p.reasons]
    report.up_to_date = [p.entry.name for p in plans if not p.reasons]
    for name in report.up_to_date:  # a build killed after its final rename leaves only leftovers here
        shutil.rmtree(out / STAGING / name, ignore_errors=True)
    if not todo:
        say(f"nothing to rebuild: all {len(plans)} entries are up to date")
    for p in todo:
        say(f"building {p.entry.name} ({', '.join(p.reasons)})")
    for task, result in runner.run(run_task, [p.task for p in todo]):
        if result.get("status") == "built":
            report.built.append(task.name)
            if result.get("resumed"):
                report.resumed[task.name] = result["resumed"]
            t = result.get("timings", {})
            parts = [f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in t.items()]
            kept = f"; reused: {', '.join(result['resumed'])}" if result.get("resumed") else ""
            say(f"built {task.name} ({', '.join(parts) or 'no new work'}{kept})")
        else:
            report.errors[task.name] = result.get("error", "unknown error")
            say(f"failed {task.name}: {report.errors[task.name]}")
    statuses = {}
    for p in plans:
        name = p.entry.name
        manifest = read_json(out / name / MANIFEST) if is_complete(out / name) else None
        if name in report.errors or manifest is None:
            statuses[name] = ("error", [report.errors.get(name, "not built")], manifest)
            continue
        fails = check_gates(p.entry.gates, manifest["metrics"])
        statuses[name] = ("failed" if fails else "passed", fails, manifest)
        report.gate_failures += [f"{name}: {f}" for f in fails]
    write_index(out, plans, statuses, zoo_file)
    report.seconds = time.perf_counter() - t0
    if report.built:
        say(f"rebuilt {len(report.built)} of {len(plans)} entries in {report.seconds:.1f} s")
    return report
