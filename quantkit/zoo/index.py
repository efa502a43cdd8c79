"""`DIR/index.json` and `DIR/index.md`: the whole zoo in one comparison table, plus the evaluator's plot.

index.json lists every entry of the zoo file in order with its status (passed, failed,
error), gate failures, metrics, and the sha256 of its manifest (so `zoo verify` also
catches an edited manifest). Only `passed` entries are published. Both files are
rewritten only when their content changes, so a no-op build touches nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from quantkit.zoo.entry import MANIFEST
from quantkit.zoo.fingerprint import sha256_file

log = logging.getLogger(__name__)

INDEX_JSON = "index.json"
INDEX_MD = "index.md"
PLOT = "index-plot.png"
SCHEMA = "quantkit-zoo-index/1"


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True


def _fmt(v: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v / scale, spec)


def _scheme(recipe: dict[str, Any]) -> str:
    from quantkit.registry import method_class

    if not method_class(recipe["method"]).uses_scheme:  # a fixed grid: the method names it
        return recipe["method"]
    s = recipe["scheme"]
    return f"w{s['bits']}" + ("" if s["group_size"] == -1 else f"g{s['group_size']}") + ("" if s["sym"] else " asym")


def index_data(plans: list[Any], statuses: dict[str, tuple[str, list[str], dict | None]], zoo_file: Path) -> dict:
    entries = []
    protocol = None
    for p in plans:
        name = p.entry.name
        status, fails, manifest = statuses[name]
        item: dict[str, Any] = {"name": name, "model": p.entry.model_name, "base_model": p.entry.base_model,
                                "method": p.entry.recipe.method, "status": status, "failures": fails,
                                "gates": p.entry.gates.model_dump(exclude_none=True), "path": name}
        if manifest is not None:
            item.update(scheme=_scheme(manifest["recipe"]), metrics=manifest["metrics"],
                        digest=manifest["inputs"]["digest"], manifest_sha256=manifest["_sha256"],
                        files=len(manifest["files"]))
            protocol = protocol or manifest["evaluation"].get("protocol")
        entries.append(item)
    return {"schema": SCHEMA, "zoo": zoo_file.name, "entries": entries,
            "published": [e["name"] for e in entries if e["status"] == "passed"], "protocol": protocol}


def _combined(data: dict[str, Any], manifests: dict[str, dict]) -> dict[str, Any]:
    """One evaluator result for the whole zoo: each model's base row once, then every entry row."""
    rows, bases = [], set()
    for e in data["entries"]:
        m = manifests.get(e["name"])
        if m is None:
            continue
        for row in m["evaluation"]["rows"]:
            if row.get("is_base"):
                if e["model"] in bases:
                    continue
                bases.add(e["model"])
            rows.append(row)
    return {"protocol": data["protocol"], "rows": rows}


def markdown(data: dict[str, Any], plot_name: str | None, eval_tables: list[str]) -> str:
    lines = [f"# Model zoo: {data['zoo']}", "",
             f"{len(data['published'])} of {len(data['entries'])} entries pass their gates and are published.", "",
             "| entry | model | method | scheme | size MB | bits/w | ppl | Δppl % | KL | top-1 % | status |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for e in data["entries"]:
        m = e.get("metrics") or {}
        status = e["status"] if not e["failures"] else f"{e['status']}: {'; '.join(e['failures'])}"
        lines.append(f"| {e['name']} | {e['model']} | {e['method']} | {e.get('scheme', '-')} | "
                     f"{_fmt(m.get('size_bytes'), '.1f', 1e6)} | {_fmt(m.get('bits_per_weight'), '.2f')} | "
                     f"{_fmt(m.get('ppl'), '.3f')} | {_fmt(m.get('delta_ppl_pct'), '+.1f')} | "
                     f"{_fmt(m.get('kl'), '.4f')} | {_fmt(m.get('top1'), '.2f')} | {status.replace('|', '/')} |")
    if plot_name:
        lines += ["", f"![perplexity against size]({plot_name})"]
    if eval_tables:
        lines += ["", "## Evaluation (quantkit eval, every entry against its base)", "", *eval_tables]
    return "\n".join(lines) + "\n"


def write_index(out: Path, plans: list[Any], statuses: dict[str, tuple[str, list[str], dict | None]],
                zoo_file: Path) -> dict[str, Any]:
    """Write index.json, index.md and (when the evaluator offers it) the plot; returns the index data."""
    manifests: dict[str, dict] = {}
    for name, (_, _, manifest) in statuses.items():
        if manifest is not None:
            manifest["_sha256"] = sha256_file(out / name / MANIFEST)
            manifests[name] = manifest
    data = index_data(plans, statuses, zoo_file)
    combined = _combined(data, manifests)
    index_text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    unchanged = (out / INDEX_JSON).is_file() and (out / INDEX_JSON).read_text(encoding="utf-8") == index_text
    plot_name = None
    if unchanged and (out / PLOT).is_file():
        plot_name = PLOT  # same rows as last time: the picture is still right (drawing it costs seconds)
    elif combined["rows"]:
        plot_name = _plot(combined, out)
    tables = []
    if combined["rows"]:
        from quantkit.eval.report import markdown as eval_markdown

        tables.append(eval_markdown(combined))
    _write_if_changed(out / INDEX_JSON, index_text)
    _write_if_changed(out / INDEX_MD, markdown(data, plot_name, tables))
    return data


def _plot(result: dict[str, Any], out: Path) -> str | None:
    """The evaluator's size/quality plot, if `quantkit.eval.plot` offers one (written only when it changes)."""
    try:
        from quantkit.eval import plot as plot_mod
    except ImportError:
        return None
    fn = getattr(plot_mod, "plot", None)
    if fn is None:
        return None
    tmp = out / f".{PLOT}.tmp.png"
    try:
        fn(result, tmp)
    except Exception as exc:  # noqa: BLE001 - the index is still written without the picture
        log.warning("no plot for the index: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        tmp.unlink(missing_ok=True)
        return None
    final = out / PLOT
    if final.is_file() and final.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        tmp.replace(final)
    return PLOT
