"""`quantkit eval`: the comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.options import Dataset, Device, JsonOut, Quiet, Seqlen, TextField
from quantkit.cli.ui import emit_json, progress_bar


def eval_cmd(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Checkpoints or models to evaluate.")],
    base: Annotated[Optional[str], typer.Option("--base", help="The float model they came from (KL, top-1, Δppl).")] = None,
    dataset: Dataset = "wiki-vital",
    text_field: TextField = "text",
    seqlen: Seqlen = 512,
    max_windows: Annotated[int, typer.Option("--max-windows", min=1, help="Windows scored.")] = 40,
    device: Device = "auto",
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the table as Markdown.")] = None,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """Perplexity (and KL / top-1 against --base) of each checkpoint, in one table."""
    from quantkit.api import resolve_device
    from quantkit.eval.report import markdown, rich_table
    from quantkit.eval.runner import evaluate_paths

    ui = ctx.obj
    quiet = quiet or ui.quiet
    with progress_bar(not quiet, "eval") as bar:
        result = evaluate_paths(paths, base=base, dataset=dataset, seqlen=seqlen, max_windows=max_windows,
                                device=resolve_device(device), text_field=text_field, progress=bar)
    emit_json(result, json_out)
    if markdown_out is not None:
        markdown_out.write_text(markdown(result))
    if not quiet and json_out != "-":
        ui.out.print(rich_table(result))
