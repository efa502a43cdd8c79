"""Model cards: README.md with Hugging Face YAML front matter, the evaluation table and the recipe.

Front matter keys follow the Hub's model card metadata: `base_model` (+ `base_model_relation:
quantized`), `license` carried over from the base model's card (or given in the zoo file),
`tags`, `library_name`, `pipeline_tag`; `quantization` holds quantkit's details.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from quantkit.zoo.recipe import RECIPE_FILE, Recipe

log = logging.getLogger(__name__)


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a Markdown file ({} when there is none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(model_path: str | Path) -> str | None:
    """The license of a base model: its README front matter, or a GGUF file's general.license."""
    path = Path(model_path)
    if path.is_dir() and (path / "README.md").is_file():
        lic = front_matter((path / "README.md").read_text(encoding="utf-8", errors="replace")).get("license")
        return str(lic) if lic else None
    if path.suffix == ".gguf" and path.is_file():
        try:
            from gguf import GGUFReader

            f = GGUFReader(path).fields.get("general.license")
            return bytes(f.parts[f.data[0]]).decode("utf-8") if f is not None else None
        except (ImportError, OSError, ValueError, KeyError, IndexError):
            return None
    return None


def model_license(model: str, model_path: str | Path) -> str | None:
    """The base model's license: its files, or for a built-in alias the GGUF file it comes from."""
    found = base_license(model_path)
    if found is None:
        from quantkit.models import sources

        if model in sources.ALIASES:
            try:
                found = base_license(sources._alias_gguf(model))
            except sources.ModelSourceError:
                return None
    return found


def _scheme_tags(recipe: Recipe) -> list[str]:
    from quantkit.registry import method_class

    method = recipe.method
    cls = method_class(method)
    if not cls.uses_scheme:  # a fixed grid: the method's own tags
        return list(cls.card_tags)
    s = recipe.quant_scheme()
    group = "-per-channel" if s.group_size == -1 else f"g{s.group_size}"
    return [f"{s.bits}-bit", f"w{s.bits}{group}", method]


def quantization_details(recipe: Recipe, fmt: str | None) -> dict[str, Any]:
    from quantkit.registry import method_class

    eff = recipe.effective()
    out: dict[str, Any] = {"tool": "quantkit", "method": recipe.method, "format": fmt}
    if method_class(recipe.method).uses_scheme:
        s = eff["scheme"]
        out.update(bits=s["bits"], group_size=s["group_size"], sym=s["sym"], desc_act=s["desc_act"])
    if eff["calibration"]:
        c = eff["calibration"]
        out["calibration"] = {k: c[k] for k in ("dataset", "nsamples", "seqlen", "seed")}
    return out


def _table(result: dict[str, Any]) -> str:
    from quantkit.eval.report import markdown

    return markdown(result)


def model_card(task: Any, recipe: Recipe, result: dict[str, Any]) -> str:
    """README.md text for one entry (`task` is a `quantkit.zoo.entry.Task`)."""
    card = task.card
    rows = [r for r in result["rows"] if not r.get("is_base")]
    fmt = rows[0].get("format") if rows else None
    license_ = card.get("license")
    meta: dict[str, Any] = {}
    if card.get("base_model"):
        meta["base_model"] = card["base_model"]
        meta["base_model_relation"] = "quantized"
    if license_:
        meta["license"] = license_
    else:
        log.warning("%s: the base model states no license; set `license:` for it in the zoo file", task.name)
    meta.update(library_name="transformers", pipeline_tag="text-generation",
                tags=["quantkit", "quantized", *(_scheme_tags(recipe)), *([fmt] if fmt and fmt != recipe.method else [])],
                quantization=quantization_details(recipe, fmt))
    base = card.get("base_model") or card.get("model_name") or recipe.model
    m = rows[0] if rows else {}
    size = f"{m['size_bytes'] / 1e6:.1f} MB" if m.get("size_bytes") else "unknown size"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        f"# {task.name}", "",
        f"{base} quantized with quantkit's **{recipe.method}** method ({', '.join(_scheme_tags(recipe)[:2])}; "
        f"{fmt or recipe.method} format; {size}).",
    ]
    if recipe.description:
        lines += ["", recipe.description.strip()]
    lines += [
        "", "## Evaluation", "",
        "Measured against the base model on the same windows (quantkit eval):", "",
        _table(result).rstrip(), "",
        "## Usage", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("<this repo>")  # or: quantkit.load("<folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this repo>")',
        "```", "",
        "## Recipe", "",
        f"Made with `quantkit quantize --recipe {RECIPE_FILE} --out OUT` (the file is in this repository):", "",
        "```yaml", recipe.to_yaml().rstrip(), "```", "",
        f"Input fingerprint: `{task.inputs['digest']}` (base model files, recipe, calibration samples, "
        f"quantkit {task.inputs['quantkit_version']}); every file's sha256 is in `manifest.json`.", "",
    ]
    return "\n".join(lines)
