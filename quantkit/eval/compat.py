"""Before `quantkit eval` loads anything: every path exists, and every checkpoint is comparable with the base.

KL and top-1 compare two models' distributions token by token, so they need the same tokenizer. A base
with another vocabulary size (config.json) or another vocabulary (tokenizer.json), where both can be read
from the folders, is refused up front with one line, instead of a shape error in the middle of a row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.models.sources import ModelSource, read_config, resolve


def vocab_size(src: ModelSource) -> int | None:
    """config.json's vocab_size (or its text_config's) of a folder; None where it cannot be read cheaply."""
    if src.kind != "folder":
        return None
    cfg = read_config(Path(src.path))
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def vocabulary(src: ModelSource) -> Any:
    """The token -> id table of a folder's tokenizer.json, or None (no such file, or not a readable one)."""
    f = Path(src.path) / "tokenizer.json"
    if src.kind != "folder" or not f.is_file():
        return None
    try:
        return (json.loads(f.read_text()).get("model") or {}).get("vocab")
    except (OSError, ValueError, AttributeError):
        return None


def _source(path: str) -> ModelSource | None:
    """The path's source; a path that does not exist at all is bad input (exit 2), while a folder or file that
    exists but cannot be read is one failed row (None here: the row reports why, the other rows complete)."""
    if not Path(path).expanduser().exists():
        return resolve(path)  # an alias or a hub id resolves; anything else is "not found"
    try:
        src = resolve(path)
    except QuantkitError:
        return None
    if src.kind == "folder" and read_config(Path(src.path)).get("auto_map"):
        raise QuantkitError(f"{path}: its config.json names code of its own (auto_map), which quantkit eval does not "
                            f"run; eval loads the architectures transformers supports natively")
    return src


def check_comparable(paths: list[str], base: str | None) -> None:
    """Refuse a path that does not exist and a base the checkpoints cannot be compared with, before anything
    is loaded."""
    sources = {p: _source(p) for p in paths}
    if base is None:
        return
    b = resolve(base)
    b_size, b_vocab = vocab_size(b), vocabulary(b)
    for p, src in sources.items():
        if src is None:
            continue
        size = vocab_size(src)
        if size is not None and b_size is not None and size != b_size:
            raise QuantkitError(f"{p} has a vocabulary of {size:,} tokens, the base {base} {b_size:,}: KL and top-1 "
                                f"compare the same tokens, so they need the model's own base; drop --base to score "
                                f"perplexity only")
        vocab = vocabulary(src)
        if vocab is not None and b_vocab is not None and vocab != b_vocab:
            raise QuantkitError(f"{p} and the base {base} have different tokenizers (tokenizer.json vocabularies "
                                f"differ): KL and top-1 need the model's own base; drop --base to score perplexity only")
