"""GGUF export for the Llama family (Llama, Mistral, Qwen2; SmolLM2 is Llama) and Gemma 3, with llama.cpp's conventions.

What differs by architecture (gguf_arch.GGUF_ARCHS) is data: tensor names come from
`gguf.TensorNameMap`; Llama/Mistral q/k rows get llama.cpp's rotary permutation; Gemma's norms
are stored shifted by one; 1-D tensors stay F32. A quantized type is a llama.cpp mix (q4_0 ... q8_0, q4_k_m,
iq4_xs ...): each tensor's type is the one llama-quantize would give it (gguf_mix.MixPlanner),
token embeddings and output included unless `embed_type` overrides them. Every tensor is
handed to the writer as a lazy array, so the file is written tensor by tensor: peak memory
is one tensor, not the model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import (GGML_QUANT_VERSION, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, Metadata,
                  TensorNameMap)
from gguf.lazy import LazyNumpyTensor

from quantkit.convert.gguf_arch import GGUF_ARCHS, ArchSpec
from quantkit.convert.gguf_mix import MIXES, MixPlanner
from quantkit.convert.gguf_tensors import (FILE_TYPES, GGUF_TYPES, TYPE_BITS, EncodeStats, Q, byte_shape,
                                           encode_weight, permute_rows, qk_permutation, write_gguf)
from quantkit.convert.gguf_vocab import add_tokenizer
from quantkit.convert.source import Checkpoint, open_checkpoint
from quantkit.errors import OutputExistsError, QuantkitError, UnknownNameError
from quantkit.paths import atomic_file

if TYPE_CHECKING:
    from quantkit.calib.pipeline import Progress

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def add_hparams(w: GGUFWriter, cfg: dict[str, Any], type_name: str, spec: ArchSpec) -> None:
    """The architecture keys llama.cpp reads, as its convert_hf_to_gguf.py writes them for `spec`'s architecture."""
    spec.hparams(w, cfg)
    w.add_file_type(int(FILE_TYPES[type_name] if type_name in FILE_TYPES else MIXES[type_name][0]))
    w.add_quantization_version(GGML_QUANT_VERSION)


def _float_type(shape: tuple[int, ...], qtype: Q) -> Q:
    """Per-tensor type under a float file type: norms/biases F32, the rest `qtype`."""
    return Q.F32 if len(shape) == 1 else qtype


def _order(name: str) -> tuple[int, int, str]:
    m = _BLOCK.search(name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed" in name else 2, 0, name)


def _logical_tensors(ck: Checkpoint) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every weight as a float model would have it: packed Linears become `.weight`."""
    packed_keys: set[str] = set()
    out: list[tuple[str, tuple[int, ...]]] = []
    if ck.layout is not None:
        for name, (o, i) in ck.linears.items():
            packed_keys |= {f"{name}.{k}" for k in ck.layout.shapes(o, i, ck.scheme.bits, ck.scheme.group_size)}
            out.append((f"{name}.weight", (o, i)))
    out += [(k, info.shape) for k, info in ck.infos.items() if k not in packed_keys]
    return sorted(out, key=lambda t: _order(t[0]))


def export_config(ck: Checkpoint, spec: ArchSpec) -> dict[str, Any]:
    """The config the keys are written from: config.json, or (as the converter reads it) through transformers,
    whose defaults fill what the file leaves out (layer_types, rope_parameters ...)."""
    if not spec.normalized_config:
        return ck.config
    from transformers import AutoConfig

    return {**ck.config, **AutoConfig.from_pretrained(ck.folder).to_dict()}


def check_export(ck: Checkpoint, type_name: str) -> ArchSpec:
    if type_name not in GGUF_TYPES and type_name not in MIXES:
        names = list(GGUF_TYPES) + [m for m in MIXES if m not in GGUF_TYPES]
        raise UnknownNameError(f"unknown GGUF type {type_name!r}; choose one of: {', '.join(names)}")
    arch = (ck.config.get("architectures") or ["?"])[0]
    if arch not in GGUF_ARCHS:
        raise QuantkitError(f"GGUF export does not support {arch}; supported: {', '.join(GGUF_ARCHS)} "
                            "(closest: --to hf, then llama.cpp's convert_hf_to_gguf.py)")
    if ck.scheme is not None and type_name in TYPE_BITS and TYPE_BITS[type_name] != ck.scheme.bits:
        raise QuantkitError(f"a {ck.scheme.bits}-bit {ck.fmt} checkpoint cannot go to {type_name} without re-quantizing "
                            f"its calibrated grid to {TYPE_BITS[type_name]} bits; use --type f16 (dequantized) or "
                            "quantize the float model to the bit width you want")
    spec = GGUF_ARCHS[arch]
    reasons = spec.checks(export_config(ck, spec))
    if reasons:
        raise QuantkitError(f"GGUF export of {arch} does not support {'; '.join(reasons)}; "
                            "closest: --to hf, then llama.cpp's convert_hf_to_gguf.py")
    return spec


def _producer(ck: Checkpoint, hf_name: str, qtype: Q, perm: torch.Tensor | None, stats: EncodeStats,
              importance: np.ndarray | None, shift: float = 0.0, given: torch.Tensor | None = None):
    def run() -> np.ndarray:
        mod = hf_name.rsplit(".", 1)[0]
        if given is not None:  # a float tensor computed before the export (a norm tuned end to end), HF convention
            w: Any = given[perm] if perm is not None else given
            if shift:
                w = w.float() + shift
        elif hf_name.endswith(".weight") and mod in ck.linears:
            qw = ck.quantized(mod)
            qw.bias = None
            w: Any = permute_rows(qw, perm) if perm is not None else qw
        else:
            w = ck.tensor(hf_name)  # kept in its dtype: encode_float converts chunk by chunk
            w = w[perm] if perm is not None else w
            if shift:
                w = w.float() + shift  # in float32, as transformers computes 1 + w
        return encode_weight(w, qtype, hf_name, stats, importance)
    return run


def _named_tensors(ck: Checkpoint, spec: ArchSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, llama.cpp name, shape) of every tensor the file holds, in file order."""
    tmap, arch_name = TensorNameMap(spec.arch, int(ck.config["num_hidden_layers"])), MODEL_ARCH_NAMES[spec.arch]
    out = []
    for hf_name, shape in _logical_tensors(ck):
        if hf_name.endswith(spec.skip):
            continue
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise QuantkitError(f"tensor {hf_name} has no llama.cpp name for {arch_name}; "
                                "closest: --to hf, then llama.cpp's convert_hf_to_gguf.py")
        out.append((hf_name, gname, tuple(shape)))
    return out


def _planner(type_name: str, tensors: list[tuple[str, str, tuple[int, ...]]], cfg: dict[str, Any],
             has_imatrix: bool, embed_type: str | None) -> MixPlanner | None:
    """llama.cpp's per-tensor type rules for a quantized file type; None for f32/f16/bf16."""
    if type_name not in MIXES:
        if embed_type is not None:
            raise QuantkitError(f"--embed-type goes with a quantized --type, not {type_name}")
        return None
    override = None
    if embed_type is not None:
        if embed_type not in GGUF_TYPES:
            raise UnknownNameError(f"unknown --embed-type {embed_type!r}; choose one of: {', '.join(GGUF_TYPES)}")
        override = GGUF_TYPES[embed_type]
    heads = int(cfg["num_attention_heads"])
    return MixPlanner(type_name, [(g, s) for _, g, s in tensors], int(cfg["num_hidden_layers"]),
                      n_gqa=heads // int(cfg.get("num_key_value_heads") or heads), has_imatrix=has_imatrix,
                      embd_type=override, output_type=override)


def _type_counts(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


class _Counter:
    """Reports the tensors the GGUF writer has encoded so far (it encodes lazily, while writing)."""

    def __init__(self, progress: Progress | None):
        self.progress, self.done, self.total = progress, 0, 0

    def tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress("tensors", self.done, self.total)


def _counted(run: Callable[[], np.ndarray], counter: _Counter) -> Callable[[], np.ndarray]:
    def counted() -> np.ndarray:
        out = run()
        counter.tick()
        return out
    return counted


def _exact(ck: Checkpoint, type_name: str, stats: EncodeStats) -> bool:
    """Exact: f32 of an fp32/packed source, or a packed source whose Linears all kept their grid.

    (The float embedding/output of a packed source take llama.cpp's type; the facts list them under
    floats_quantized, and --embed-type f16 keeps them float.)"""
    if type_name == "f32":
        return all(i.dtype in (torch.float32, torch.int32, torch.int64) or not i.dtype.is_floating_point
                   or ck.scheme is not None for i in ck.infos.values())
    return ck.scheme is not None and not stats.requantized and type_name in TYPE_BITS


def plan_types(src: str | Path, type_name: str, has_imatrix: bool = True,
               embed_type: str | None = None) -> dict[str, GGMLQuantizationType]:
    """{HF tensor name: the type `export_gguf` gives it} for `src` as `type_name` (checked as the export checks)."""
    ck = open_checkpoint(src)
    tensors = _named_tensors(ck, check_export(ck, type_name))
    planner = _planner(type_name, tensors, ck.config, has_imatrix, embed_type)
    if planner is None:
        return {hf: _float_type(shape, GGUF_TYPES[type_name]) for hf, _, shape in tensors}
    plan = planner.plan()
    return {hf: plan[g] for hf, g, _ in tensors}


def _shift(spec: ArchSpec, hf_name: str, shape: tuple[int, ...]) -> float:
    """What the converter adds to this tensor: `spec.norm_shift` on norm weights, else 0."""
    return spec.norm_shift if len(shape) == 1 and hf_name.endswith("norm.weight") else 0.0


def _given(data: np.ndarray, perm: torch.Tensor | None, shape: tuple[int, ...], qtype: Q, name: str):
    """The producer of a tensor whose bytes were computed before the export (rows in HF order)."""
    want = byte_shape(shape, qtype)[0]
    if data.shape != want or data.dtype != np.uint8:
        raise QuantkitError(f"{name}: encoded {data.dtype} {data.shape} is not {qtype.name} bytes of shape {want}")
    return lambda: data[perm.numpy()] if perm is not None else data


def export_gguf(src: str | Path, out: Path, type_name: str, force: bool = False, provenance: str = "{}",
                progress: Progress | None = None, importance: dict[str, np.ndarray] | None = None,
                embed_type: str | None = None, encoded: dict[str, np.ndarray] | None = None,
                floats: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write `src` (plain HF or packed folder) as a GGUF file at `out`; returns provenance facts.

    `progress("tensors", done, total)` as the writer encodes each tensor.
    `importance`: {llama.cpp tensor name: (in,) mean x**2 of its input} (llama.cpp's imatrix):
    every tensor it names is rounded with llama.cpp's importance-weighted search.
    `embed_type`: the token embedding's and output's type instead of llama.cpp's choice.
    `encoded`: {HF Linear name: its bytes in the type `plan_types` gives it}, computed elsewhere (GPTQ on
    the GGUF grid); the mix then follows llama.cpp's with-imatrix rules, as the bytes were calibrated.
    `floats`: {HF tensor name: float tensor} written instead of the source's (norms tuned end to end); each
    must name a tensor of the file.
    `provenance` (JSON text) is stored under the key quantkit.provenance.
    """
    ck = open_checkpoint(src)
    spec = check_export(ck, type_name)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    if out.exists() and not out.is_file():
        raise QuantkitError(f"output {out} exists and is not a file; remove it or choose another path")
    cfg = export_config(ck, spec)
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    tensors = _named_tensors(ck, spec)
    if unknown := sorted(set(floats or {}) - {t[0] for t in tensors}):
        raise QuantkitError(f"{unknown[0]}: a given float tensor the file does not hold")
    planner = _planner(type_name, tensors, cfg, importance is not None or encoded is not None, embed_type)
    stats = EncodeStats()
    types: dict[str, str] = {}
    floats_quantized: list[str] = []  # a packed source's float tensors given a block type (lossy)
    with atomic_file(out) as tmp:
        writer = GGUFWriter(tmp, MODEL_ARCH_NAMES[spec.arch])
        writer.add_type("model")
        total = 0
        counter = _Counter(progress)
        for hf_name, gname, shape in tensors:
            perm = None
            if spec.permute_qk and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", hf_name):
                perm = qk_permutation(shape[0], heads if ".q_proj." in hf_name else kv_heads)
            ttype = planner.type_of(gname, shape) if planner else _float_type(shape, GGUF_TYPES[type_name])
            types[gname] = ttype.name
            if ck.scheme is not None and ttype not in (Q.F32, Q.F16) and hf_name.rsplit(".", 1)[0] not in ck.linears:
                floats_quantized.append(gname)
            imp = None if importance is None else importance.get(gname)
            bshape, bdtype = byte_shape(tuple(shape), ttype)
            mod = hf_name.removesuffix(".weight")
            run = (_given(encoded[mod], perm, tuple(shape), ttype, hf_name) if encoded and mod in encoded
                   else _producer(ck, hf_name, ttype, perm, stats, imp, _shift(spec, hf_name, shape),
                                  (floats or {}).get(hf_name)))
            lazy = LazyNumpyTensor(meta=LazyNumpyTensor.meta_with_dtype_and_shape(bdtype, bshape),
                                   func=_counted(run, counter))
            writer.add_tensor(gname, lazy, raw_dtype=None if ttype in (Q.F32, Q.F16) else ttype)
            total += int(np.prod(shape))
            counter.total += 1
        Metadata.load(None, ck.folder, None, total).set_gguf_meta_model(writer)
        add_hparams(writer, cfg, type_name, spec)
        add_tokenizer(writer, ck.folder, int(cfg["vocab_size"]))
        writer.add_string("quantkit.provenance", provenance)
        write_gguf(writer)
    facts: dict[str, Any] = {
        "gguf_type": type_name,
        "architecture": MODEL_ARCH_NAMES[spec.arch],
        "grid_kept": len(stats.exact),
        "requantized": len(stats.requantized),
        "exact": _exact(ck, type_name, stats),
        "tensor_types": _type_counts(types),
        "calibrated": importance is not None or bool(encoded),
    }
    if encoded:
        facts["encoded_elsewhere"] = len(encoded)
    if floats_quantized:
        facts["floats_quantized"] = floats_quantized
    if stats.requantized:
        facts["requantized_reasons"] = sorted(set(stats.requantized.values()))
        facts["added_error"] = {"rel_rmse": stats.rel_rmse, "max_abs": stats.max_abs}
        log.warning("%d quantized Linears were re-quantized to %s (%s): added error rel RMSE %.3e, max |dw| %.3e",
                    len(stats.requantized), type_name, ", ".join(facts["requantized_reasons"]),
                    stats.rel_rmse, stats.max_abs)
    return facts
