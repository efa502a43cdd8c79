"""Options shared by several commands, declared once."""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; errors only.")]
JsonOut = Annotated[Optional[str], typer.Option("--json", help="Write a JSON summary to this file ('-' for stdout).")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
Dataset = Annotated[str, typer.Option("--dataset", help="wiki-vital (built in), a .txt/.jsonl/.json/.parquet file, or a datasets id name:config:split.")]
TextField = Annotated[str, typer.Option("--text-field", help="Field holding the text in .jsonl/.json/.parquet/datasets.")]
Seqlen = Annotated[int, typer.Option("--seqlen", min=8, help="Tokens per window.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the calibration sample draw and of the method.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model folder/hub (off by default).")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def in_panel(option: Any, panel: str) -> Any:
    """`option` (one of the Annotated options above) shown in the help panel `panel`."""
    base, info = typing.get_args(option)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[base, info]
