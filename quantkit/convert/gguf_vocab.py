"""The tokenizer as llama.cpp expects it in a GGUF file from a tokenizer.json: a BPE ("gpt2") vocabulary.

Two kinds of tokenizer.json are written, as llama.cpp's convert_hf_to_gguf.py writes them (its
get_vocab_base):
- byte-level BPE (Llama 3, SmolLM, Qwen2): tokens as they are;
- SPM-style BPE (Gemma 3 without tokenizer.model): the normalizer turns " " into "\u2581", BPE runs on
  the whole text with byte fallback ("<0xXX>" tokens). llama.cpp runs it with its gemma4
  pre-tokenizer (split on newlines only, raw UTF-8, spaces escaped).
Tokens are listed by id (missing ids become "[PAD<id>]" of type UNUSED); added tokens that are
special, or look special (<unused..>, <|..|>, <mask>), are CONTROL, other added tokens
USER_DEFINED with "\u2581" written as a space; the rest NORMAL, except that the byte-fallback tokens
"<0xXX>" of an SPM-style vocabulary are BYTE (the converter leaves them NORMAL, and llama.cpp then
prints "<0xE2>" where it should emit the byte; tokenization is the same either way).
Merges, special-token ids, add-bos/eos flags and the chat template come from `gguf.SpecialVocab`.
The pre-tokenizer name (llama.cpp uses it to pick its split regex) is chosen as the converter
chooses it: the sha256 of the token ids of its probe text, looked up among the hashes it knows
for the tokenizers of the architectures quantkit exports; otherwise it is read from
tokenizer.json's structure.
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
    # Gemma 3's tokenizer.json: llama.cpp's table lists it under granite-embedding-311m-multilingual-r2, which
    # shares it; llama.cpp runs that name as its gemma4 (SPM-style BPE) pre-tokenizer
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
}
SPM_BPE_PRE = "gemma4"  # llama.cpp's own name for the SPM-style BPE pre-tokenizer


def spm_style(tok: dict[str, Any]) -> bool:
    """A BPE with byte fallback whose normalizer only turns " " into "\u2581" and whose pre-tokenizer splits nothing
    more (none, or a split on " " that the normalizer left without spaces): what llama.cpp's gemma4 pre runs."""
    model, norm, pre = tok.get("model", {}), tok.get("normalizer") or {}, tok.get("pre_tokenizer")
    replaces_space = (norm.get("type") == "Replace" and norm.get("pattern") == {"String": " "}
                      and norm.get("content") == "\u2581")
    no_split = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and replaces_space and no_split


def pre_by_hash(path: Path) -> str | None:
    """llama.cpp's pre-tokenizer name for tokenizer.json at `path` by its probe hash, or None if unknown."""
    try:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(path)).encode(PROBE).ids
    except Exception as e:  # noqa: BLE001 - any tokenizer failure falls back to the structural guess
        log.debug("probe tokenization failed (%s); using the structural pre-tokenizer guess", e)
        return None
    return PRE_BY_HASH.get(sha256(str(ids).encode()).hexdigest())


def looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def vocab_lists(tok: dict[str, Any], vocab_size: int, tokenizer=None) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1 from a tokenizer.json dict, as the converter lists them.

    `tokenizer` (a `tokenizers.Tokenizer`): added tokens that are not normalized are written as it decodes
    their encoding (the converter's pre-normalization); without it they are written as they are."""
    model = tok.get("model", {})
    reverse = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    byte_fallback = bool(model.get("byte_fallback"))
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i in added:
            text = added[i]["content"]
            if tokenizer is not None and not added[i].get("normalized", True):
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].get("special") or looks_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
            tokens.append(text)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(TokenType.BYTE if byte_fallback and _byte_token(reverse[i]) else TokenType.NORMAL)
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
    spm = spm_style(tok)
    if model.get("type") != "BPE" or (model.get("byte_fallback") and not spm):
        raise QuantkitError(f"GGUF export writes byte-level and SPM-style (Gemma 3) BPE tokenizers; {folder.name}'s is "
                            f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''} "
                            "(closest: --to hf, then llama.cpp's convert_hf_to_gguf.py)")
    from tokenizers import Tokenizer

    tokens, types = vocab_lists(tok, vocab_size, Tokenizer.from_file(str(path)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_by_hash(path) or (SPM_BPE_PRE if spm else pre_tokenizer_name(tok.get("pre_tokenizer"))))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if vocab_size == 49152 and "bos" not in special.add_special_token:
        special.add_special_token["bos"] = False  # llama.cpp's converter: SmolLM / granite-small vocabularies add no BOS
    special.add_to_gguf(w, quiet=True)
