"""`quantkit zoo build|verify|publish`: the model zoo from a YAML file of models x recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.options import Device, JsonOut
from quantkit.cli.ui import emit_json

app = typer.Typer(no_args_is_help=True, help="Build, verify and publish a zoo of quantized models from recipes.")


@app.command("build")
def build(
    ctx: typer.Context,
    zoo: Annotated[Path, typer.Argument(help="Zoo file (recipes/zoo.yaml): models x recipes, with gates.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Zoo folder: one sub-folder per entry, index.md, index.json.")],
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Rebuild this entry even if nothing changed (repeatable).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Entries built in parallel processes.")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="local (process pool when --jobs > 1), process, or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray).")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="Only the entries of this model name (repeatable; one CI matrix job per model).")] = None,
    device: Device = "auto",
    json_out: JsonOut = None,
) -> None:
    """Build every entry whose inputs changed, evaluate it, gate it, and write the index.

    Exit code 1 when a gate fails or an entry cannot be built (one line each on stderr).
    """
    from quantkit.zoo.build import build_zoo

    ui = ctx.obj
    report = build_zoo(zoo, out, force=force or [], jobs=jobs, executor=executor, device=device,
                       ray_address=ray_address, models=model or [], say=lambda s: ui.quiet or ui.err.print(s, highlight=False, markup=False))
    emit_json(report.as_dict(), json_out)
    for name, err in report.errors.items():
        typer.echo(f"build failed: {name}: {err}", err=True)
    for line in report.gate_failures:
        typer.echo(f"gate failed: {line}", err=True)
    if not ui.quiet and json_out != "-":
        ui.out.print(f"{out / 'index.md'}: {len(report.built)} built, {len(report.up_to_date)} up to date, "
                     f"{len(report.gate_failures)} gate failures, {len(report.errors)} errors "
                     f"({report.seconds:.1f} s)", highlight=False)
    if not report.ok:
        raise SystemExit(1)  # not typer.Exit: the root group maps every Exception it sees to one line


@app.command("verify")
def verify(ctx: typer.Context,
           out: Annotated[Path, typer.Argument(help="Zoo folder written by `quantkit zoo build`.")]) -> None:
    """Recheck the sha256 of every file of every built entry; exit 1 on any mismatch or missing file."""
    from quantkit.zoo.publish import read_index, verify_zoo

    problems = verify_zoo(out)
    for name, found in problems.items():
        for p in found:
            typer.echo(f"verify failed: {name}: {p}", err=True)
    if problems:
        raise SystemExit(1)  # not typer.Exit: the root group maps every Exception it sees to one line
    n = sum(1 for e in read_index(out)["entries"] if "manifest_sha256" in e)
    ctx.obj.out.print(f"{out}: {n} entries, every file matches its manifest", highlight=False)


@app.command("publish")
def publish(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Zoo folder written by `quantkit zoo build`.")],
    repo_prefix: Annotated[str, typer.Option("--repo-prefix", help="Hub repo id prefix, e.g. myorg/ (repo = prefix + entry name).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded; upload nothing.")] = False,
    private: Annotated[bool, typer.Option("--private", help="Create new repos as private.")] = False,
    json_out: JsonOut = None,
) -> None:
    """Upload the entries that passed their gates (each verified first) with huggingface_hub."""
    from quantkit.zoo.publish import publish_zoo

    ui = ctx.obj
    plans = publish_zoo(out, repo_prefix, dry_run=dry_run, private=private,
                        say=lambda s: ui.out.print(s, highlight=False, markup=False))
    emit_json(plans, json_out)
