"""Entry point: the Typer app, global flags, and the one map from exceptions to messages."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from quantkit.cli import commands, convert, evaluate, quantize
from quantkit.cli import zoo as zoo_cli
from quantkit.cli.method_options import MethodFlagsCommand
from quantkit.cli.ui import UI, setup_logging
from quantkit.errors import QuantkitError, RowsFailedError


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


_OS_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EROFS: "read-only filesystem", errno.ENOSPC: "no space left on the device",
              errno.EDQUOT: "disk quota exceeded"}


def _message(exc: BaseException) -> tuple[str, int] | None:
    """The one exception -> (message, exit code) map. None means: not ours, re-raise.

    Exit codes: 0 ok, 1 a job or row failed (or an internal error), 2 bad input or environment, 130 interrupted."""
    if isinstance(exc, QuantkitError):
        return f"error: {exc}", exc.exit_code
    if isinstance(exc, KeyboardInterrupt):  # api.quantize notes what was kept and how to continue
        notes = getattr(exc, "__notes__", None) or ["nothing was written to the output"]
        return f"interrupted: {notes[-1]}", 130
    if type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory: {str(exc).splitlines()[0]} (try fewer --nsamples, a smaller --seqlen or --offload disk)", 1
    if isinstance(exc, MemoryError):
        return "out of host memory (try fewer --nsamples, a smaller --seqlen or --offload disk)", 1
    if type(exc).__name__ == "SafetensorError":  # a file no integrity check saw first
        return f"error: a safetensors file is damaged or unreadable: {_first_line(exc)}; re-download or re-export it", 2
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:  # the output location or the disk, not a bug
        where = f" {exc.filename}" if exc.filename else ""
        return f"error: cannot write{where}: {_OS_ERRORS[exc.errno]}; choose another output path or free the space", 2
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):  # transformers: auto_map needs remote code
        return ("error: this model's config.json asks for code from its own folder or repository (auto_map); pass "
                "--trust-remote-code if you trust that code, or use a model transformers supports natively"), 2
    if type(exc).__module__.startswith(("click", "typer")):
        return None  # Exit, usage errors, --help: click/typer (which vendors its own click) handle their own
    return f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for the traceback)", 1


def _json_dest(args: list[str]) -> str | None:
    """The value of the subcommand's --json, if given: a failure is reported there too."""
    for k, a in enumerate(args):
        if a == "--json" and k + 1 < len(args):
            return args[k + 1]
        if a.startswith("--json="):
            return a.split("=", 1)[1]
    return None


def _json_failure(dest: str | None, text: str, code: int) -> None:
    """With --json, a failure is still JSON: {"ok": false, "error": ..., "exit_code": N}."""
    if dest is None:
        return
    doc = json.dumps({"ok": False, "error": text.removeprefix("error: "), "exit_code": code}, indent=2)
    try:
        if dest == "-":
            sys.stdout.write(doc + "\n")
            sys.stdout.flush()
        else:
            Path(dest).write_text(doc + "\n")
    except OSError:
        pass  # the one line on stderr still says what failed


class QuantkitGroup(TyperGroup):
    def invoke(self, ctx: click.Context):
        json_dest = _json_dest([*getattr(ctx, "_protected_args", []), *ctx.args])
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - mapped to one line below, or re-raised
            ui = ctx.obj if isinstance(ctx.obj, UI) else UI()
            mapped = _message(exc)
            if mapped is None or ui.debug:
                raise
            text, code = mapped
            ui.close(summarise=isinstance(exc, RowsFailedError))  # a user error stays the only line
            if not isinstance(exc, RowsFailedError):  # failed rows: the result JSON, with each row's error, went out
                _json_failure(json_dest, text, code)
            typer.echo(text, err=True)
            ctx.exit(code)
        finally:
            if isinstance(ctx.obj, UI):
                ctx.obj.close()


app = typer.Typer(cls=QuantkitGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face causal LMs, convert between serving formats, and measure what each checkpoint costs and loses.")


@app.callback()
def root(ctx: typer.Context,
         debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only.")] = False,
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also quantkit's INFO lines and every warning of the libraries it uses (by default they are counted and summarised once).")] = False) -> None:
    ctx.obj = UI(quiet=quiet, debug=debug, verbose=verbose)
    ctx.obj.warnings = setup_logging(quiet, debug, verbose)


app.command("methods")(commands.methods)
app.command("quantize", cls=MethodFlagsCommand, epilog=quantize.EPILOG)(quantize.quantize)
app.command("eval")(evaluate.eval_cmd)
app.command("info")(commands.info)
app.command("convert")(convert.convert)
app.command("demo")(commands.demo)
app.command("cache")(commands.cache)
app.add_typer(zoo_cli.app, name="zoo")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug and --verbose may be given anywhere; they are global flags.
    for flag in ("--debug", "--verbose"):
        if flag in args[1:]:
            args.remove(flag)
            args.insert(0, flag)
    app(args=args, prog_name="quantkit")
