"""compressed-tensors checkpoints (what llm-compressor writes and vLLM loads): `pack-quantized` integer weights
(below), and 8-bit weights with quantized activations, `int-quantized` / `float-quantized` (`quantkit.formats.ct_naive`).

Tensors of one quantized Linear (out, in), n_groups = in / group_size (1 for per channel):
    weight_packed:     (out, in*bits/32)        int32, codes packed along the *input* dim
    weight_scale:      (out, n_groups)          fp16 (the model's float dtype in general)
    weight_shape:      (2,)                     int64, [out, in]
    weight_zero_point: (out*bits/32, n_groups)  int32, zero points packed along the *output* dim (asymmetric only)
    weight_g_idx:      (in,)                    int32 (actorder "group" only)

compressed-tensors quantizes to signed q in [-2**(b-1), 2**(b-1)) and dequantizes
w = scale * (q - zp); packing adds 2**(b-1) to q and zp and writes a dense little-endian
bit stream (32 values in `bits` words). The stored unsigned values are therefore
exactly GPTQ's unsigned code and zero (code = q + 2**(b-1)), and the bit stream is
GPTQ's: `pack_rows` along the packed dim. A symmetric grid stores no zero point
(zp = 0, i.e. the unsigned zero 2**(b-1)). For 2, 4 and 8 bits this layout is the
same in every compressed-tensors release; for 3 bits it is the dense layout that
compressed-tensors writes since its 1-8 bit packing change (May 2026).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from quantkit.errors import CheckpointError
from quantkit.formats.ct_naive import CTNaiveLayout
from quantkit.formats.packing import pack_rows, unpack_rows
from quantkit.grid import QuantizedWeight, trivial_g_idx
from quantkit.models.kvcache import KVCacheError, check_kv_cache_scheme, kv_cache_scheme
from quantkit.scheme import ActivationScheme, QuantScheme

CT_FORMAT = "pack-quantized"
NAIVE_FORMATS = {"int": "int-quantized", "float": "float-quantized"}


class CTLayout:
    """QuantizedWeight <-> compressed-tensors pack-quantized tensors of one Linear."""

    name: ClassVar[str] = "compressed-tensors"
    marker: ClassVar[str] = "weight_packed"  # the tensor whose presence marks a quantized Linear

    def __init__(self, sym: bool = True, g_idx: bool = False):
        self.sym, self.g_idx = sym, g_idx

    def shapes(self, out_f: int, in_f: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        ng = 1 if group_size == -1 else in_f // group_size
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "weight_packed": ((out_f, in_f * bits // 32), torch.int32),
            "weight_scale": ((out_f, ng), torch.float16),
            "weight_shape": ((2,), torch.int64),
        }
        if not self.sym:
            out["weight_zero_point"] = ((out_f * bits // 32, ng), torch.int32)
        if self.g_idx:
            out["weight_g_idx"] = ((in_f,), torch.int32)
        return out

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        mid = 1 << (qw.bits - 1)
        if self.sym and not bool((qw.zeros == mid).all()):
            raise ValueError(f"a symmetric compressed-tensors grid needs every zero point at {mid}")
        if not self.g_idx and not qw.trivial_g_idx:
            raise ValueError("act-order g_idx needs actorder 'group' (weight_g_idx) in compressed-tensors")
        out_f, in_f = qw.shape
        t = {
            "weight_packed": pack_rows(qw.codes.t(), qw.bits).t().contiguous(),   # (out, in*bits/32)
            "weight_scale": qw.scales.to(torch.float16).contiguous(),              # (out, n_groups)
            "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if not self.sym:
            t["weight_zero_point"] = pack_rows(qw.zeros, qw.bits)                  # (out*bits/32, n_groups)
        if self.g_idx:
            t["weight_g_idx"] = qw.g_idx.to(torch.int32).contiguous()
        return t

    def unpack(self, t: dict[str, Tensor], bits: int, group_size: int, sym: bool) -> QuantizedWeight:
        codes = unpack_rows(t["weight_packed"].t().contiguous(), bits).t()  # (out, in)
        out_f, in_f = codes.shape
        scales = t["weight_scale"].float().reshape(out_f, -1)
        if self.sym:
            zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int32)
        else:
            zeros = unpack_rows(t["weight_zero_point"], bits)[:out_f]  # (out, n_groups)
        g_idx = t["weight_g_idx"].to(torch.int32) if self.g_idx else trivial_g_idx(in_f, group_size).to(codes.device)
        return QuantizedWeight(codes=codes.contiguous().to(torch.uint8), scales=scales.contiguous(),
                               zeros=zeros.contiguous().to(torch.uint8), g_idx=g_idx, bits=bits,
                               group_size=group_size, sym=sym)


EMBEDDING_TARGET = "Embedding"  # the config group of a quantized token embedding, as llm-compressor writes it


EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")  # token tables by name


def is_embedding_name(module: str) -> bool:
    """Is `module` a token embedding by its name (what a checkpoint's headers alone can tell)?"""
    return module.rsplit(".", 1)[-1] in EMBEDDING_NAMES


def is_embedding_group(group: dict[str, Any]) -> bool:
    """Does this config group quantize the token embedding (targets `Embedding`), not the Linears?"""
    return EMBEDDING_TARGET in (group.get("targets") or [])


def _weights_args(qc: dict[str, Any]) -> dict[str, Any]:
    """The weight args of the Linears' config group (an `Embedding` group is read by `embedding_grid`)."""
    groups = qc.get("config_groups") or {}
    weights = [g.get("weights") for g in groups.values()
               if isinstance(g, dict) and g.get("weights") and not is_embedding_group(g)]
    if len(weights) != 1:
        raise CheckpointError(f"compressed-tensors config with {len(weights)} weight groups; quantkit reads exactly one")
    w = weights[0]
    if w.get("dynamic") not in (None, False):
        raise CheckpointError("compressed-tensors: dynamic weight quantization is not supported by quantkit.load")
    return w


def embedding_grid(qc: dict[str, Any]) -> tuple[int, int, bool] | None:
    """(bits, group_size, sym) of a quantized token embedding (a config group targeting `Embedding`), or None."""
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict) and is_embedding_group(g)]
    if not groups:
        return None
    if len(groups) > 1 or qc.get("format") != CT_FORMAT:
        raise CheckpointError("compressed-tensors: quantkit reads one pack-quantized Embedding group")
    w = groups[0].get("weights") or {}
    strategy = w.get("strategy") or ("group" if w.get("group_size") else "channel")
    bits = w.get("num_bits", 8)
    if w.get("type", "int") != "int" or strategy not in ("group", "channel") or bits not in (2, 3, 4, 8) \
            or w.get("dynamic") not in (None, False) or groups[0].get("input_activations"):
        raise CheckpointError(f"compressed-tensors Embedding group: quantkit reads integer weights in 2, 3, 4 or 8 bits "
                              f"per group or channel (got {w.get('type')} {bits}-bit {strategy})")
    return bits, -1 if strategy == "channel" else int(w["group_size"]), bool(w.get("symmetric", True))


def _pack_args(bits: int, group_size: int, sym: bool, actorder: str | None) -> dict[str, Any]:
    """pack-quantized weight args as llm-compressor serializes them."""
    return {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": None if group_size == -1 else group_size,
            "strategy": "channel" if group_size == -1 else "group", "block_structure": None, "dynamic": False,
            "actorder": actorder, "observer": "minmax", "observer_kwargs": {}}


def _args(strategy: str, number: str, dynamic: bool, observer: str | None) -> dict[str, Any]:
    """One compressed-tensors QuantizationArgs as llm-compressor serializes it (8-bit, symmetric)."""
    return {"num_bits": 8, "type": number, "symmetric": True, "group_size": None, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": None, "scale_dtype": None, "zp_dtype": None,
            "observer": observer, "observer_kwargs": {}}


def _activations(qc: dict[str, Any]) -> ActivationScheme | None:
    groups = qc.get("config_groups") or {}
    acts = [g.get("input_activations") for g in groups.values() if isinstance(g, dict) and g.get("input_activations")]
    if not acts:
        return None
    a = acts[0]
    if a.get("num_bits", 8) != 8 or not a.get("symmetric", True):
        raise CheckpointError("compressed-tensors: quantkit reads symmetric 8-bit input activations only")
    try:
        return ActivationScheme(type=a.get("type", "int"), strategy=a.get("strategy") or "token",
                                dynamic=a.get("dynamic") not in (False, None))
    except ValueError as e:
        raise CheckpointError(f"compressed-tensors input_activations: {str(e).splitlines()[0]}") from None


def _kv_args(scheme: QuantScheme) -> dict[str, Any] | None:
    """kv_cache_scheme: FP8 keys and values with one static scale per layer (`quantkit.models.kvcache`)."""
    return kv_cache_scheme() if scheme.kv_cache == "fp8" else None


def _kv_cache(qc: dict[str, Any]) -> str | None:
    """The scheme's kv_cache from a config's kv_cache_scheme (refused unless quantkit computes it)."""
    args = qc.get("kv_cache_scheme")
    if args is None:
        return None
    try:
        check_kv_cache_scheme(args)
    except KVCacheError as e:
        raise CheckpointError(f"compressed-tensors {e}") from None
    return "fp8"


def _ignore_to_skip(ignore: list[str]) -> tuple[str, ...]:
    """compressed-tensors `ignore` ("lm_head", "re:.*gate$") -> quantkit fnmatch skip patterns."""
    out = []
    for p in ignore:
        if p.startswith("re:"):
            body = p[3:].lstrip("^").rstrip("$").replace("\\.", ".").replace(".*", "*")
            out.append(body)
        else:
            out.append(p)
    return tuple(out)


class CTFormat:
    """quantization_config {quant_method: compressed-tensors, format: pack-quantized, config_groups: ...}."""

    name: ClassVar[str] = "compressed-tensors"

    def quantization_config(self, scheme: QuantScheme, extra: dict[str, Any]) -> dict[str, Any]:
        if scheme.input_activations is not None or scheme.type != "int" or scheme.strategy is not None:
            return self.naive_config(scheme, extra)
        weights = _pack_args(scheme.bits, scheme.group_size, scheme.sym,
                             "group" if extra.get("g_idx", scheme.desc_act) else None)
        groups = {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                              "output_activations": None, "format": CT_FORMAT}}
        if scheme.embedding_grid is not None:  # a second group, as llm-compressor writes a quantized embedding
            groups["group_1"] = {"targets": [EMBEDDING_TARGET], "weights": _pack_args(*scheme.embedding_grid, None),
                                 "input_activations": None, "output_activations": None, "format": CT_FORMAT}
        return {
            "quant_method": "compressed-tensors",
            "format": CT_FORMAT,
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": list(extra.get("ignore", ["lm_head"])),
            "kv_cache_scheme": _kv_args(scheme),
            "global_compression_ratio": None,
            "sparsity_config": {},
        }

    def naive_config(self, scheme: QuantScheme, extra: dict[str, Any]) -> dict[str, Any]:
        """int-quantized / float-quantized, with input_activations (and the kv_cache_scheme, if any)."""
        act = scheme.input_activations
        fmt = NAIVE_FORMATS[scheme.type]
        group = {"targets": ["Linear"], "weights": _args(scheme.weight_strategy, scheme.type, False, scheme.observer),
                 "input_activations": None if act is None else
                 _args(act.strategy, act.type, act.dynamic, None if act.dynamic else "static_minmax"),
                 "output_activations": None, "format": fmt}
        return {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": list(extra.get("ignore", ["lm_head"])),
            "kv_cache_scheme": _kv_args(scheme),
            "global_compression_ratio": None,
            "sparsity_config": {},
        }

    def matches(self, qc: dict[str, Any]) -> bool:
        return qc.get("quant_method") == "compressed-tensors" and qc.get("format") in (
            CT_FORMAT, *NAIVE_FORMATS.values(), "naive-quantized")

    def read(self, qc: dict[str, Any]) -> tuple[CTLayout | CTNaiveLayout, QuantScheme]:
        if qc.get("format") != CT_FORMAT:
            return self.read_naive(qc)
        w = _weights_args(qc)
        if w.get("type", "int") != "int":
            raise CheckpointError("compressed-tensors pack-quantized: only integer weights are supported by quantkit.load")
        strategy = w.get("strategy") or ("group" if w.get("group_size") else "channel")
        if strategy not in ("group", "channel"):
            raise CheckpointError(f"compressed-tensors weight strategy {strategy!r} is not supported; group or channel is")
        group_size = -1 if strategy == "channel" else int(w.get("group_size") or -1)
        sym, emb = bool(w.get("symmetric", True)), embedding_grid(qc)
        try:
            scheme = QuantScheme(bits=w.get("num_bits", 8), group_size=group_size, sym=sym,
                                 desc_act=w.get("actorder") in ("group", "weight", True, "dynamic", "static"),
                                 skip=_ignore_to_skip(qc.get("ignore") or []), kv_cache=_kv_cache(qc),
                                 embedding={(8, -1, True): "int8", (4, group_size, sym): "int4"}.get(emb))
        except ValueError as e:
            raise CheckpointError(f"malformed compressed-tensors quantization_config: {str(e).splitlines()[0]}") from None
        return CTLayout(sym=scheme.sym, g_idx=w.get("actorder") in ("group", "dynamic")), scheme

    def read_naive(self, qc: dict[str, Any]) -> tuple[CTNaiveLayout, QuantScheme]:
        w = _weights_args(qc)
        number, strategy = w.get("type", "int"), w.get("strategy") or "channel"
        if w.get("num_bits", 8) != 8 or not w.get("symmetric", True) or strategy not in ("channel", "tensor"):
            raise CheckpointError(f"compressed-tensors {qc.get('format')}: quantkit reads symmetric 8-bit weights per "
                                  f"channel or per tensor (got {w.get('num_bits')}-bit {strategy}, "
                                  f"symmetric={w.get('symmetric')})")
        act = _activations(qc)
        try:
            scheme = QuantScheme(bits=8, group_size=-1, sym=True, type=number,
                                 strategy="tensor" if strategy == "tensor" else None, input_activations=act,
                                 skip=_ignore_to_skip(qc.get("ignore") or []), kv_cache=_kv_cache(qc))
        except ValueError as e:
            raise CheckpointError(f"malformed compressed-tensors quantization_config: {str(e).splitlines()[0]}") from None
        layout = CTNaiveLayout(number, per_tensor=strategy == "tensor", static_input=act is not None and not act.dynamic)
        return layout, scheme

    def embedding_layout(self, qc: dict[str, Any]) -> CTLayout:
        """The layout of the quantized token embedding's tensors (its rows are the Linear's outputs)."""
        grid = embedding_grid(qc)
        if grid is None:
            raise CheckpointError("compressed-tensors config has no Embedding group")
        return CTLayout(sym=grid[2])

    def side_files(self, qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {}
