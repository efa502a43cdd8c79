"""The tokenizer as llama.cpp expects it in a GGUF file: a byte-level BPE ("gpt2") vocabulary.

Tokens are listed by id (missing ids become "[PAD<id>]" of type UNUSED); added special tokens
are CONTROL, other added tokens USER_DEFINED, the rest NORMAL. Merges, special-token ids,
add-bos/eos flags and the chat template come from `gguf.SpecialVocab`. The pre-tokenizer
name (llama.cpp uses it to pick its split regex) is chosen as llama.cpp's convert_hf_to_gguf.py
chooses it: the sha256 of the token ids of its probe text, looked up among the hashes it
knows for the architectures quantkit exports; otherwise it is read from tokenizer.json's structure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hashlib import sha256

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


# convert_hf_to_gguf.py's probe text (get_vocab_base_pre): whitespace runs, emoji, digits, CJK, quotes.
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
         "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
         "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
         "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
         "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
         "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
         "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
# sha256(str(token ids of PROBE)) -> tokenizer.ggml.pre, the entries of llama.cpp's table for the exported families
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",     # Mistral Nemo
}


def pre_by_hash(path: Path) -> str | None:
    """llama.cpp's pre-tokenizer name for tokenizer.json at `path` by its probe hash, or None if unknown."""
    try:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(path)).encode(PROBE).ids
    except Exception as e:  # noqa: BLE001 - any tokenizer failure falls back to the structural guess
        log.debug("probe tokenization failed (%s); using the structural pre-tokenizer guess", e)
        return None
    return PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest())


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
    w.add_tokenizer_pre(pre_by_hash(path) or pre_tokenizer_name(tok.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if vocab_size == 49152 and "bos" not in special.add_special_token:
        special.add_special_token["bos"] = False  # llama.cpp's converter: SmolLM / granite-small vocabularies add no BOS
    special.add_to_gguf(w, quiet=True)
