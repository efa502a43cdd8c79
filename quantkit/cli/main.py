"""Entry point: the Typer app, global flags, and the one map from exceptions to messages."""

from __future__ import annotations

import sys
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


def _message(exc: BaseException) -> tuple[str, int] | None:
    """The one exception -> (message, exit code) map. None means: not ours, re-raise."""
    if isinstance(exc, QuantkitError):
        return f"error: {exc}", exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory: {str(exc).splitlines()[0]} (try fewer --nsamples, a smaller --seqlen or --offload disk)", 1
    if isinstance(exc, MemoryError):
        return "out of host memory (try fewer --nsamples, a smaller --seqlen or --offload disk)", 1
    if type(exc).__name__ == "SafetensorError":  # a file no integrity check saw first (e.g. --load-awq)
        return f"error: a safetensors file is damaged or unreadable: {_first_line(exc)}; re-download or re-export it", 2
    if type(exc).__module__.startswith(("click", "typer")):
        return None  # Exit, usage errors, --help: click/typer (which vendors its own click) handle their own
    return f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for the traceback)", 1


class QuantkitGroup(TyperGroup):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:  # noqa: BLE001 - mapped to one line below, or re-raised
            ui = ctx.obj if isinstance(ctx.obj, UI) else UI()
            mapped = _message(exc)
            if mapped is None or ui.debug:
                raise
            text, code = mapped
            ui.close(summarise=isinstance(exc, RowsFailedError))  # a user error stays the only line
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
