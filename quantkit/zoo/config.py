"""The zoo file: models x recipes, with defaults and gates, expanded into named entries.

    overrides:                     # over every recipe (e.g. a CPU-sized zoo reusing full-size recipes)
      calibration: {nsamples: 16, seqlen: 256}
    defaults:                      # under every recipe (a recipe's own values win)
      calibration: {nsamples: 128, seqlen: 2048}
      evaluation: {seqlen: 2048, max_windows: 40}
      gates: {max_ppl_increase_pct: 10}
    models:
      - model: meta-llama/Llama-3.1-8B        # folder, hub id, .gguf file or alias
        name: llama-3.1-8b                    # entry name prefix (default: last path part, lower case)
        base_model: meta-llama/Llama-3.1-8B   # for the model card (default: the model if it is a hub id)
        license: llama3.1                     # default: the base model card's license
        gates: {max_kl: 0.1}
        recipes:
          - smollm2-w4g64.yaml                # a recipe file, relative to this file
          - METHOD:w4g128                     # a registered method name[:preset]
          - {recipe: x.yaml, name: x-fast, calibration: {nsamples: 32}}   # a file with overrides
          - {method: METHOD, preset: w4g128, options: {KEY: VALUE}}       # an inline recipe

An entry is named `<model name>-<recipe name>`; a recipe's name is its `name:`, else
the file name, else `method-preset`. Gates merge per key: recipe over model over defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantkit.zoo.recipe import (Calibration, Evaluation, Gates, Recipe, RecipeError, _local_path, error_line,
                                 parse_recipe, read_yaml)

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(_Strict):
    calibration: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}
    gates: Gates = Gates()
    save_dtype: str | None = None


class ZooModel(_Strict):
    model: str
    name: str | None = Field(None, pattern=NAME)
    base_model: str | None = None
    license: str | None = None
    gates: Gates = Gates()
    recipes: list[str | dict[str, Any]] = Field(min_length=1)


class Overrides(_Strict):
    calibration: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}
    save_dtype: str | None = None


class ZooFile(_Strict):
    name: str | None = None
    defaults: Defaults = Defaults()
    overrides: Overrides = Overrides()
    models: list[ZooModel] = Field(min_length=1)


@dataclass(frozen=True)
class Entry:
    """One artifact of the zoo: a recipe applied to a model."""

    name: str
    model_name: str
    recipe: Recipe
    gates: Gates
    base_model: str | None
    license: str | None
    source: str          # where the recipe came from (file or zoo key path), for messages


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _merge_gates(*layers: Gates) -> Gates:
    merged: dict[str, Any] = {}
    for g in layers:
        merged.update(g.model_dump(exclude_none=True))
    return Gates(**merged)


def _model_name(m: ZooModel) -> str:
    if m.name:
        return m.name
    return Path(m.model.rstrip("/")).name.removesuffix(".gguf").lower()


def _looks_like_hub(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and not Path(model).exists()


def _item(item: str | dict[str, Any], zoo_dir: Path, where: str, key: tuple[Any, ...]
          ) -> tuple[dict[str, Any], str, Path, tuple[Any, ...], str]:
    """(raw recipe mapping, file or zoo path for errors, folder for relative paths, key prefix, default name)."""
    if isinstance(item, str):
        item = {"recipe": item} if item.endswith((".yaml", ".yml")) else {
            "method": item.partition(":")[0], **({"preset": item.partition(":")[2]} if ":" in item else {})}
        if "method" in item:
            return item, where, zoo_dir, key, "-".join(x for x in (item["method"], item.get("preset")) if x)
    ref = item.get("recipe")
    if ref is None:
        name = "-".join(str(x) for x in (item.get("method"), item.get("preset")) if x)
        return dict(item), where, zoo_dir, key, name
    path = zoo_dir / ref if not Path(ref).is_absolute() else Path(ref)
    raw = _deep_merge(read_yaml(path), {k: v for k, v in item.items() if k != "recipe"})
    return raw, str(path), path.parent, (), path.stem


def load_zoo(path: str | Path) -> list[Entry]:
    """Validate a zoo file and every recipe it names; entries in file order, names unique."""
    path = Path(path)
    where = str(path)
    try:
        zoo = ZooFile(**read_yaml(path))
    except ValidationError as err:
        raise RecipeError(error_line(where, err)) from None
    base = {"calibration": zoo.defaults.calibration, "evaluation": zoo.defaults.evaluation}
    if zoo.defaults.save_dtype:
        base["save_dtype"] = zoo.defaults.save_dtype
    over = zoo.overrides.model_dump(exclude_none=True)
    for key, layer in (("defaults", base), ("overrides", over)):
        for section, model in (("calibration", Calibration), ("evaluation", Evaluation)):
            try:
                model(**layer.get(section, {}))
            except ValidationError as err:
                raise RecipeError(error_line(where, err, (key, section))) from None
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    for i, m in enumerate(zoo.models):
        prefix = _model_name(m)
        for j, item in enumerate(m.recipes):
            key = ("models", i, "recipes", j)
            raw, src, folder, err_prefix, default_name = _item(item, path.parent, where, key)
            raw = _deep_merge(_deep_merge(base, raw), over)
            raw["model"] = _local_path(m.model, path.parent)
            recipe = parse_recipe(raw, src, folder, err_prefix)
            name = f"{prefix}-{recipe.name or default_name}"
            if name in seen:
                raise RecipeError(f"{where}: {'.'.join(map(str, key))}: entry name {name} is already used by "
                                  f"{seen[name]}; give one of them a different `name:`")
            seen[name] = src if src != where else ".".join(map(str, key))
            entries.append(Entry(name=name, model_name=prefix, recipe=recipe.model_copy(update={"name": recipe.name or default_name}),
                                 gates=_merge_gates(zoo.defaults.gates, m.gates, recipe.gates),
                                 base_model=m.base_model or (m.model if _looks_like_hub(m.model) else None),
                                 license=m.license, source=src))
    return entries
