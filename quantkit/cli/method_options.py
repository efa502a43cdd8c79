"""Method options on the command line, from each method's Options model (nothing here names a method).

Two spellings reach the same option:
- `--opt KEY=VALUE` (repeatable; also `--option`, `-O`);
- `--KEY VALUE`, `--KEY=VALUE`, and for a boolean option `--KEY` / `--no-KEY`, for any option of any
  registered method. `MethodFlagsCommand` rewrites them to a hidden `--method-flag KEY=VALUE` before click
  parses the command line, so the quantize command grows with the methods without a parameter per option.

`method_options` then checks every key and value against the chosen method's Options model and raises one
`QuantkitError` line (exit code 2) for the first problem.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import click
from pydantic import BaseModel, ValidationError
from typer.core import TyperCommand

from quantkit.errors import QuantkitError

FLAG_PARAM = "--method-flag"


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(a is bool or a is type(None) for a in typing.get_args(annotation))
    return False


def option_kinds() -> dict[str, bool]:
    """Every registered method's option names -> whether the option is a boolean (a flag without a value)."""
    from quantkit.registry import method_class, method_names

    kinds: dict[str, bool] = {}
    for name in method_names():
        for key, f in method_class(name).Options.model_fields.items():
            kinds[key] = kinds.get(key, True) and _is_bool(f.annotation)
    return kinds


def rewrite_flags(args: list[str], known: set[str], kinds: dict[str, bool] | None = None) -> list[str]:
    """`args` with every method-option flag turned into `--method-flag KEY=VALUE` (others left as they are)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            return out + args[i - 1:]
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or name in known:
            out.append(arg)
            continue
        kinds = option_kinds() if kinds is None else kinds
        key = name[2:].replace("-", "_")
        negated = key.startswith("no_") and kinds.get(key[3:]) is True and key not in kinds
        key = key[3:] if negated else key
        if key not in kinds:
            out.append(arg)  # click reports it: no such option
            continue
        if kinds[key] and not eq:
            value = "false" if negated else "true"
        elif not eq:
            if i >= len(args):
                raise click.UsageError(f"Option '{name}' requires an argument.")
            value = args[i]
            i += 1
        out += [FLAG_PARAM, f"{key}={value}"]
    return out


class MethodFlagsCommand(TyperCommand):
    """A Typer command that also takes any registered method's options as flags (see the module docstring)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        known = {o for p in self.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
        return super().parse_args(ctx, rewrite_flags(list(args), known))


def _dashed(key: str) -> str:
    return "--" + key.replace("_", "-")


def _pairs(items: list[str], what: str) -> list[tuple[str, str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QuantkitError(f"{what} {item}: expected KEY=VALUE")
        out.append((key.strip().replace("-", "_"), value, item))
    return out


def method_options(method: Any, opts: list[str], flags: list[str]) -> dict[str, Any]:
    """The options `--opt` items and method flags give (flags last, so they win), checked against the method's
    Options model; one QuantkitError line on an unknown key or a bad value."""
    model: type[BaseModel] = method.Options
    fields = model.model_fields
    valid = ", ".join(fields) or "none"
    out: dict[str, Any] = {}
    for key, value, item in _pairs(opts, "--opt"):
        if key not in fields:
            raise QuantkitError(f"--opt {item}: {method.name} has no option {key!r}; its options: {valid}")
        out[key] = value
    for key, value, _ in _pairs(flags, "--opt"):
        if key not in fields:
            raise QuantkitError(f"{_dashed(key)} does not apply to method {method.name} (its options: {valid})")
        out[key] = value
    try:
        model(**out)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise QuantkitError(f"{_dashed(loc)}: {e['msg'].removeprefix('Value error, ')}") from None
    return out
