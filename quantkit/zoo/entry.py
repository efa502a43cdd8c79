"""Building one zoo entry: quantize, evaluate, write the card and the manifest, then publish it into DIR.

All work happens in a staging folder `DIR/.build/<name>/` whose `inputs.json` names
the input fingerprint it belongs to:

  checkpoint/   written by `quantkit.api.quantize` through `atomic_dir`: present = complete
  eval.json     the evaluator's result, written atomically
  checkpoint/manifest.json   written last (temp file + rename), after README.md and the recipe

Only then is `checkpoint/` renamed to `DIR/<name>`. A build killed at any point leaves
either no `DIR/<name>`, or the previous complete one; the next build finds the staging
folder, keeps every finished step whose inputs still match, and finishes the entry.
An entry folder is complete exactly when its manifest exists and its files match it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantkit.paths import durable_replace, fsync_dir
from quantkit.zoo.fingerprint import sha256_file, tree_files
from quantkit.zoo.recipe import Recipe, write_recipe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CARD = "README.md"
STAGING = ".build"
SCHEMA = "quantkit-zoo-manifest/1"


@dataclass
class Task:
    """Everything a worker (thread, process or Ray task) needs to build one entry; plain data, picklable."""

    name: str
    recipe: dict[str, Any]          # Recipe.model_dump(mode="json")
    model_path: str                 # local base model (folder or .gguf) as the driver resolved it
    out: str                        # the zoo folder DIR
    inputs: dict[str, Any]          # Inputs.as_dict()
    card: dict[str, Any] = field(default_factory=dict)   # base_model, license, model_name, zoo
    device: str = "auto"
    threads: int | None = None
    model: str = ""                 # the model as the zoo names it (a Ray node without model_path resolves this)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    durable_replace(tmp, path, synced=True)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of every file of an entry folder except the manifest."""
    return {rel.as_posix(): {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
            for rel in tree_files(folder) if rel.as_posix() != MANIFEST}


def is_complete(folder: Path, digest: str | None = None) -> bool:
    """A manifest that parses, matches `digest` (if given), and whose files all exist with their sizes."""
    m = read_json(Path(folder) / MANIFEST)
    if not m or m.get("schema") != SCHEMA or not isinstance(m.get("files"), dict):
        return False
    if digest is not None and m.get("inputs", {}).get("digest") != digest:
        return False
    return all((Path(folder) / rel).is_file() and (Path(folder) / rel).stat().st_size == meta["size"]
               for rel, meta in m["files"].items())


def metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The gated and tabulated figures of the entry row, with the base perplexity beside them."""
    base = next((r for r in result["rows"] if r.get("is_base")), {})
    row = next((r for r in result["rows"] if not r.get("is_base")), {})
    keys = ("ppl", "delta_ppl_pct", "kl", "kl_p99", "top1", "size_bytes", "bits_per_weight", "tokens", "error")
    return {**{k: row.get(k) for k in keys}, "base_ppl": base.get("ppl"), "base_size_bytes": base.get("size_bytes")}


def _quantize(task: Task, recipe: Recipe, ckpt: Path) -> float:
    from quantkit.api import quantize

    t0 = time.perf_counter()
    quantize(task.model_path, recipe.method, ckpt, scheme=recipe.quant_scheme(), calib=recipe.calib_spec(),
             options=recipe.options, device=task.device, save_dtype=recipe.save_dtype, force=True)
    return time.perf_counter() - t0


def _evaluate(task: Task, recipe: Recipe, ckpt: Path) -> dict[str, Any]:
    from quantkit.eval.runner import evaluate_paths

    e = recipe.evaluation
    result = evaluate_paths([str(ckpt)], base=task.model_path, dataset=e.dataset, text_field=e.text_field,
                            seqlen=e.seqlen, max_windows=e.max_windows, stride=e.stride, device=task.device)
    for row in result["rows"]:  # name rows by what they are, not by the staging path
        row["model"] = row["label"] = task.card.get("model_name", "base") if row.get("is_base") else task.name
    return result


def _swap_in(ckpt: Path, final: Path, staging: Path) -> None:
    """Replace `final` by `ckpt`; `final` is at every moment absent, the old complete entry, or the new one."""
    if final.exists():
        old = staging / "old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(ckpt, final)
    fsync_dir(final.parent)  # the entry's files were fsynced by atomic_dir; now its name


def build_entry(task: Task) -> dict[str, Any]:
    """Build (or finish building) one entry; returns {name, status, seconds, resumed, error?}."""
    from quantkit.zoo.card import model_card

    if task.threads:
        import torch

        torch.set_num_threads(task.threads)
    recipe = Recipe(**task.recipe)
    if task.model and not Path(task.model_path).exists():  # another machine: its own download of the same model
        from quantkit.zoo.fingerprint import local_model

        task = replace(task, model_path=str(local_model(task.model)[0]))
    out = Path(task.out)
    staging = out / STAGING / task.name
    ckpt, eval_file, inputs_file = staging / "checkpoint", staging / "eval.json", staging / "inputs.json"
    digest = task.inputs["digest"]
    resumed: list[str] = []
    if (read_json(inputs_file) or {}).get("digest") != digest:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    write_json_atomic(inputs_file, task.inputs)
    times = read_json(staging / "times.json") or {}
    if is_complete(ckpt, digest):
        resumed.append("manifest")
    else:
        if (ckpt / "quantkit.json").is_file() and (ckpt / "config.json").is_file():
            resumed.append("checkpoint")
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
            times["quantize_seconds"] = round(_quantize(task, recipe, ckpt), 3)
            write_json_atomic(staging / "times.json", times)
        result = read_json(eval_file)
        if result is not None:
            resumed.append("evaluation")
        else:
            t0 = time.perf_counter()
            result = _evaluate(task, recipe, ckpt)
            times["eval_seconds"] = round(time.perf_counter() - t0, 3)
            write_json_atomic(eval_file, result)
            write_json_atomic(staging / "times.json", times)
        for stale in (ckpt / MANIFEST, ckpt / CARD):
            stale.unlink(missing_ok=True)
        write_recipe(ckpt, recipe)
        (ckpt / CARD).write_text(model_card(task, recipe, result), encoding="utf-8")
        manifest = {
            "schema": SCHEMA,
            "name": task.name,
            "model": task.card.get("model_name"),
            "base_model": task.card.get("base_model"),
            "inputs": task.inputs,
            "recipe": recipe.effective(),
            "metrics": metrics(result),
            "evaluation": result,
            "timings": times,
            "files": file_table(ckpt),
        }
        write_json_atomic(ckpt / MANIFEST, manifest)  # last: from here on the folder is a complete entry
    _swap_in(ckpt, out / task.name, staging)
    shutil.rmtree(staging, ignore_errors=True)
    return {"name": task.name, "status": "built", "resumed": resumed, "timings": times}


def run_task(task: Task) -> dict[str, Any]:
    """`build_entry` that never raises: an executor's worker returns the error as one line instead."""
    try:
        return build_entry(task)
    except Exception as exc:  # noqa: BLE001 - reported per entry; the other entries still build
        log.debug("building %s failed", task.name, exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        from quantkit.errors import QuantkitError

        msg = first if isinstance(exc, QuantkitError) else f"{type(exc).__name__}: {first}"
        return {"name": task.name, "status": "error", "error": msg}
