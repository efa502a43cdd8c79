"""Recipes: one YAML file = model, method, scheme, method options, calibration and evaluation.

A recipe is validated like a scheme (`extra="forbid"`); every error is one line that
starts with the file and the key path, e.g.
`recipes/x.yaml: calibration.nsamples: Input should be greater than or equal to 1`.

The *effective* recipe (preset expanded, method option defaults filled in, calibration
dropped for methods that take none) is what identifies a build: `canonical()` is its
JSON with sorted keys, hashed into the zoo's input fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantkit.errors import QuantkitError
from quantkit.methods.base import CalibSpec
from quantkit.scheme import PRESETS, QuantScheme

RECIPE_FILE = "quantkit_recipe.yaml"
SCHEME_KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "skip")
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class RecipeError(QuantkitError):
    """A recipe or zoo file that cannot be read or does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(_Strict):
    dataset: str = "wiki-vital"
    text_field: str = "text"
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0
    batch_size: int = Field(8, ge=1)


class Evaluation(_Strict):
    dataset: str = "wiki-vital"
    text_field: str = "text"
    seqlen: int = Field(512, ge=8)
    max_windows: int | None = Field(40, ge=1)
    stride: int | None = Field(None, ge=1)


class Gates(_Strict):
    """Limits an artifact must meet to be published (None = not checked)."""

    max_ppl_increase_pct: float | None = Field(None, ge=0.0)
    max_kl: float | None = Field(None, ge=0.0)
    min_top1: float | None = Field(None, ge=0.0, le=100.0)


class SchemeFields(_Strict):
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    desc_act: bool | None = None
    static_groups: bool | None = None
    skip: list[str] | None = None


class Recipe(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = None
    model: str | None = None
    method: str
    preset: str | None = None
    scheme: SchemeFields = SchemeFields()
    options: dict[str, Any] = {}
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    save_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    gates: Gates = Gates()

    # ---- effective values --------------------------------------------------------
    def scheme_dict(self) -> dict[str, Any]:
        fields: dict[str, Any] = dict(PRESETS[self.preset]) if self.preset else {}
        fields.update(self.scheme.model_dump(exclude_none=True))
        return fields

    def quant_scheme(self) -> QuantScheme:
        fields = self.scheme_dict()
        if "skip" in fields:
            fields["skip"] = tuple(fields["skip"])
        return QuantScheme(**fields)

    def calib_spec(self) -> CalibSpec:
        return CalibSpec(**self.calibration.model_dump())

    def needs_calibration(self) -> bool:
        from quantkit.registry import get_method

        return bool(get_method(self.method).needs_calibration)

    def effective(self) -> dict[str, Any]:
        """What determines the artifact and its metrics (not name, description or gates).

        The model is identified by its files' hashes in the fingerprint, not by its path here,
        so moving a local base model does not rebuild anything.
        """
        from quantkit.registry import get_method

        impl = get_method(self.method)
        return {
            "method": self.method,
            "scheme": self.quant_scheme().model_dump(mode="json"),
            "options": impl.Options(**self.options).model_dump(mode="json"),
            "calibration": self.calibration.model_dump() if impl.needs_calibration else None,
            "evaluation": self.evaluation.model_dump(),
            "save_dtype": self.save_dtype,
        }

    def canonical(self) -> str:
        return json.dumps(self.effective(), sort_keys=True, separators=(",", ":"))

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
        data["scheme"] = {k: v for k, v in data.get("scheme", {}).items() if v is not None}
        if not data["scheme"]:
            del data["scheme"]
        if not data.get("gates"):
            data.pop("gates", None)
        return yaml.safe_dump(data, sort_keys=False)


# ---- errors --------------------------------------------------------------------------
def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(x) for x in loc)


def error_line(where: str, err: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    """All of a pydantic error's problems, on one line, each with its key path."""
    parts = []
    for e in err.errors():
        loc = _loc(tuple(prefix) + tuple(e["loc"])) or "recipe"
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            parts.append(f"{loc}: required key is missing")
        else:
            parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return f"{where}: " + "; ".join(parts)


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of keys (model, method, ...), got {type(data).__name__}")
    return data


def _local_path(value: str | None, base_dir: Path | None) -> str | None:
    """A path relative to the YAML file's folder, when such a file or folder exists there."""
    if value is None or base_dir is None or Path(value).is_absolute():
        return value
    candidate = base_dir / value
    return str(candidate.resolve()) if candidate.exists() else value


def parse_recipe(data: dict[str, Any], where: str, base_dir: Path | None = None,
                 prefix: tuple[Any, ...] = ()) -> Recipe:
    """Validate a recipe mapping; `where` names the file in error lines, `prefix` its key path there."""
    from quantkit.registry import get_method

    try:
        recipe = Recipe(**data)
    except ValidationError as err:
        raise RecipeError(error_line(where, err, prefix)) from None
    at = (lambda key: _loc(tuple(prefix) + (key,)))  # noqa: E731 - key path of a top-level field
    try:
        impl = get_method(recipe.method)
    except QuantkitError as e:
        raise RecipeError(f"{where}: {at('method')}: {e}") from None
    if recipe.preset is not None and recipe.preset not in PRESETS:
        raise RecipeError(f"{where}: {at('preset')}: unknown preset {recipe.preset!r}; choose one of: {', '.join(PRESETS)}")
    try:
        recipe.quant_scheme()
    except ValidationError as err:
        raise RecipeError(error_line(where, err, tuple(prefix) + ("scheme",))) from None
    try:
        impl.Options(**recipe.options)
    except ValidationError as err:
        raise RecipeError(error_line(where, err, tuple(prefix) + ("options",))) from None
    except QuantkitError as e:  # option models that raise their own one-line errors (bitsandbytes)
        raise RecipeError(f"{where}: {at('options')}: {e}") from None
    updates = {"model": _local_path(recipe.model, base_dir)}
    for section in ("calibration", "evaluation"):
        sub = getattr(recipe, section)
        updates[section] = sub.model_copy(update={"dataset": _local_path(sub.dataset, base_dir)})
    return recipe.model_copy(update=updates)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(read_yaml(path), str(path), path.parent)


def write_recipe(folder: Path, recipe: Recipe) -> Path:
    out = Path(folder) / RECIPE_FILE
    out.write_text("# The recipe this checkpoint was made with: quantkit quantize --recipe " + RECIPE_FILE
                   + " --out OUT\n" + recipe.to_yaml(), encoding="utf-8")
    return out


def recipe_from_summary(summary: dict[str, Any], save_dtype: str) -> Recipe:
    """The recipe equivalent to a finished `quantkit.api.quantize` run (its returned summary)."""
    scheme = {k: v for k, v in summary["scheme"].items() if k in SCHEME_KEYS}
    calib = summary.get("calibration")
    return Recipe(model=summary["model"], method=summary["method"], scheme=SchemeFields(**scheme),
                  options={k: v for k, v in summary["options"].items() if v is not None},
                  calibration=Calibration(**calib) if calib else Calibration(),
                  save_dtype=DTYPE_NAMES.get(save_dtype, save_dtype))


def record_recipe(summary: dict[str, Any], save_dtype: str) -> Path:
    """Write the recipe of a finished quantize run into its checkpoint folder."""
    return write_recipe(Path(summary["out"]), recipe_from_summary(summary, save_dtype))
