"""`quantkit quantize --recipe FILE`: recipe values under the flags given on the command line.

The quantize command's parameters are filled from the recipe, except those whose
click parameter source says the user typed them (command line or environment):
those win. Two flags take whole sections with them: `--method` (when it names
another method, the recipe's method options no longer apply) and `--preset` (the
recipe's grid fields are dropped; its skip list stays unless `--skip` is given).
The recipe's method options come before the command line's `--opt` items and method flags,
which therefore override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.zoo.recipe import SCHEME_KEYS, RecipeError, load_recipe, record_recipe

__all__ = ["recipe_params", "recipe_values", "given_on_command_line", "record_recipe"]

CALIB_PARAMS = ("dataset", "text_field", "nsamples", "seqlen", "seed", "batch_size")
GRID_KEYS = tuple(k for k in SCHEME_KEYS if k != "skip")


def given_on_command_line(ctx: Any, name: str) -> bool:
    source = ctx.get_parameter_source(name)  # typer vendors click: compare by name, not by enum class
    return source is not None and getattr(source, "name", str(source)) not in ("DEFAULT", "DEFAULT_MAP")


def _option_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def recipe_values(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The quantize parameters a recipe sets (names as in `params`), before any flag overrides."""
    recipe = load_recipe(path)
    values: dict[str, Any] = {"method": recipe.method, "preset": recipe.preset, "save_dtype": recipe.save_dtype}
    if recipe.model is not None:
        values["model"] = recipe.model
    values.update({k: v for k, v in recipe.scheme.model_dump(exclude_none=True).items()})
    values.update({k: getattr(recipe.calibration, k) for k in CALIB_PARAMS})
    # method options travel as --opt KEY=VALUE, under any given on the command line (--opt or --KEY flags)
    values["option"] = [f"{k}={_option_text(v)}" for k, v in recipe.options.items() if v is not None]
    return values


def recipe_params(path: Path, ctx: Any) -> dict[str, Any]:
    """All keyword arguments for the quantize command: recipe values, then the flags given, `recipe` cleared."""
    params = dict(ctx.params)
    given = {name for name in params if given_on_command_line(ctx, name)}
    values = recipe_values(Path(path), params)
    if "method" in given and params["method"] != values["method"]:
        values["option"] = []
    if "preset" in given:
        for key in GRID_KEYS:
            values.pop(key, None)
    merged = dict(params)
    for key, value in values.items():
        if key not in params:
            raise RecipeError(f"{path}: {key}: not a quantize parameter")
        if key == "option":
            merged[key] = value + list(params.get("option") or [])
        elif key not in given:
            merged[key] = value
    if merged.get("model") is None:
        raise RecipeError(f"{path}: model: the recipe names no model; add `model:` or give MODEL on the command line")
    merged["recipe"] = None
    merged["ctx"] = ctx
    return merged
