"""The evaluation protocol: which text, which token windows, which tokens are scored.

Two ways to take the test text from a dataset (`split`):
- "tail" (default for wiki-vital and local files): the fixed split of
  quantkit.calib.data, the last 200,000 characters, tokenized without special
  tokens. Calibration never sees it.
- "all" (default for a `datasets` id that names a test or validation split, e.g.
  `wikitext:wikitext-2-raw-v1:test`): the whole split, every row (empty ones
  included) joined with "\\n\\n" and tokenized with the tokenizer's defaults, as
  one stream: the convention of the GPTQ and AWQ evaluation scripts, under which
  Llama-2-7B fp16 reads about 5.47 on WikiText-2 at seqlen 2048.
Windows are full `seqlen` windows every `stride` tokens (non-overlapping by
default); the tail shorter than a window is not scored.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from quantkit.calib import data
from quantkit.errors import DatasetError, QuantkitError
from quantkit.eval.quality import first_targets

SPLITS = ("auto", "tail", "all")


@dataclass(frozen=True)
class Protocol:
    dataset: str
    text_field: str
    split: str          # "tail" | "all" (resolved)
    seqlen: int
    stride: int         # == seqlen for non-overlapping windows
    max_windows: int | None


@dataclass
class EvalData:
    protocol: Protocol
    windows: Tensor          # (n, seqlen) int64
    firsts: list[int]        # first scored position of each window

    @property
    def scored_tokens(self) -> int:
        return sum(int(self.windows.shape[1]) - f for f in self.firsts)

    def digest(self) -> str:
        """sha256 of the exact token windows and scored positions (part of the base cache key)."""
        h = hashlib.sha256(self.windows.numpy().tobytes())
        h.update(repr((tuple(self.windows.shape), self.firsts)).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        p = self.protocol
        return {**asdict(p), "windows": int(self.windows.shape[0]), "predicted_tokens": self.scored_tokens,
                "split_text": "last 200,000 characters" if p.split == "tail" else "whole split, rows joined by \\n\\n",
                "overlapping": p.stride < p.seqlen}


def _is_hub(dataset: str) -> bool:
    return dataset != data.BUILTIN and not Path(dataset).expanduser().exists() and \
        Path(dataset).suffix.lower() not in (".txt", ".jsonl", ".json", ".parquet")


def resolve_split(dataset: str, split: str) -> str:
    if split not in SPLITS:
        raise QuantkitError(f"unknown --split {split!r}; choose one of: {', '.join(SPLITS)}")
    if split != "auto":
        return split
    parts = dataset.split(":")
    return "all" if _is_hub(dataset) and len(parts) > 2 and parts[2] in ("test", "validation") else "tail"


def _hub_rows_text(dataset: str, text_field: str) -> str:
    """Every row of a `datasets` split joined with "\\n\\n", empty rows included (GPTQ convention)."""
    name, *rest = dataset.split(":")
    config = rest[0] if rest and rest[0] else None
    split = rest[1] if len(rest) > 1 and rest[1] else "test"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown id, bad config: one line for the user
        raise DatasetError(f"cannot load dataset {dataset} (offline, or unknown id?): {str(e).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise DatasetError(f"dataset {dataset} has no column {text_field!r}; use --text-field")
    return "\n\n".join(ds[text_field])


def stream_ids(tokenizer, dataset: str, text_field: str, split: str) -> list[int]:
    if split == "tail":
        return data.tokenize(tokenizer, data.split_text(data.load_text(dataset, text_field)).test)
    text = _hub_rows_text(dataset, text_field) if _is_hub(dataset) else data.load_text(dataset, text_field)
    return tokenizer(text)["input_ids"]


def build(tokenizer, dataset: str = data.BUILTIN, seqlen: int = 512, stride: int | None = None,
          max_windows: int | None = 40, text_field: str = "text", split: str = "auto") -> EvalData:
    """The token windows and scored positions of a protocol."""
    stride = stride or seqlen
    if not 1 <= stride <= seqlen:
        raise QuantkitError(f"--stride {stride} must lie between 1 and --seqlen {seqlen}")
    split = resolve_split(dataset, split)
    ids = stream_ids(tokenizer, dataset, text_field, split)
    windows = data.eval_windows(ids, seqlen, max_windows, stride)
    proto = Protocol(dataset, text_field, split, seqlen, stride, max_windows)
    return EvalData(proto, windows, first_targets(int(windows.shape[0]), seqlen, stride))


def prompts(ev: EvalData, batch: int, length: int) -> Tensor:
    """(batch, length) int64 prompts cut from the test stream (tiled when it is short): deterministic."""
    flat = ev.windows.reshape(-1)
    need = batch * length
    reps = -(-need // flat.numel())
    return flat.repeat(reps)[:need].view(batch, length).clone().to(torch.int64)
