"""The tokenizer as llama.cpp expects it in a GGUF file: a byte-level BPE ("gpt2") vocabulary.

Tokens are listed by id (missing ids become "[PAD<id>]" of type UNUSED); added special tokens
are CONTROL, other added tokens USER_DEFINED, the rest NORMAL. Merges, special-token ids,
add-bos/eos flags and the chat template come from `gguf.SpecialVocab`. The pre-tokenizer
name is read from tokenizer.json's structure (llama.cpp uses it to pick its split regex).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType

from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's tokenizer.ggml.pre for the byte-level pre-tokenizers it can tell from structure."""
    if not pre:
        return "default"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp); "gpt2" is refused: unknown pre-tokenizer
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
            return "smollm"
    log.warning("unrecognised pre-tokenizer %s: writing tokenizer.ggml.pre 'default'", json.dumps(pre)[:120])
    return "default"


def vocab_lists(tok: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1 from a tokenizer.json dict."""
    model = tok.get("model", {})
    reverse = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return tokens, types


def add_tokenizer(w: GGUFWriter, folder: Path, vocab_size: int) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise QuantkitError(f"{folder} has no tokenizer.json; GGUF export needs the model's tokenizer files")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise QuantkitError(f"GGUF export writes byte-level BPE tokenizers; {folder.name}'s is "
                            f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''} "
                            "(closest: --to hf, then llama.cpp's convert_hf_to_gguf.py)")
    tokens, types = vocab_lists(tok, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tok.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
