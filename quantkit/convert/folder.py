"""Orchestration of safetensors -> safetensors conversions (repack, dequantize, cast), streamed.

The output tensors are planned from the source headers alone, the header is written,
then each packed Linear is read, converted by the table's pure function and written
before the next is read: memory is one Linear, not the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from quantkit.convert.repack import NotExact, check_representable, target_layout
from quantkit.convert.source import PACKED, Checkpoint, copy_side_files
from quantkit.convert.stream import PlannedTensor, StreamingWriter
from quantkit.convert.table import lookup
from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint import write_json
from quantkit.formats.specs import get_format
from quantkit.grid import trivial_g_idx

if TYPE_CHECKING:
    from quantkit.calib.pipeline import Progress

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
NOT_COPIED = {"config.json", "model.safetensors.index.json", "quantize_config.json", "quant_config.json",
              "quantkit.json", "quantkit_provenance.json"}
_EMBEDDING_HINTS = ("embed", "wte", "wpe")


def has_act_order(ck: Checkpoint) -> bool:
    """Does any packed Linear carry a non-trivial g_idx? (reads only the small g_idx tensors)"""
    assert ck.scheme is not None
    if not ck.scheme.desc_act:
        return False
    key = "g_idx" if ck.fmt in ("gptq", "gptq-v2") else "weight_g_idx"
    for name, (_, in_f) in ck.linears.items():
        if f"{name}.{key}" in ck.infos:
            if not torch.equal(ck.tensor(f"{name}.{key}").to(torch.int32), trivial_g_idx(in_f, ck.scheme.group_size)):
                return True
    return False


def _not_exact(e: NotExact) -> QuantkitError:
    return QuantkitError(f"{e} (not exact); closest: {e.hint}")


def _ignored_linears(ck: Checkpoint) -> list[str]:
    """Float 2-D weights outside the packed Linears, embeddings excepted (compressed-tensors `ignore`)."""
    names = {"lm_head"}
    for k, info in ck.infos.items():
        mod = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and len(info.shape) == 2 and mod not in ck.linears and info.dtype.is_floating_point:
            if not any(h in mod for h in _EMBEDDING_HINTS):
                names.add(mod)
    return sorted(names)


def _target_config(ck: Checkpoint, dst: str, dtype: torch.dtype, act_order: bool) -> dict[str, Any]:
    config = {k: v for k, v in ck.config.items() if k not in ("quantization_config", "torch_dtype")}
    if dst == "hf":
        config["dtype"] = str(dtype).removeprefix("torch.")
        return config
    assert ck.scheme is not None
    scheme = ck.scheme.model_copy(update={"desc_act": act_order})
    if dst.startswith("gptq"):
        qc = get_format("gptq").quantization_config(scheme, {})
        qc["checkpoint_format"] = "gptq_v2" if dst == "gptq-v2" else "gptq"
    elif dst == "compressed-tensors":
        qc = get_format(dst).quantization_config(scheme, {"g_idx": act_order, "ignore": _ignored_linears(ck)})
    else:
        qc = get_format(dst).quantization_config(scheme, {})
    config["quantization_config"] = qc
    return config


def _plan(ck: Checkpoint, dst: str, dtype: torch.dtype, act_order: bool
          ) -> tuple[list[PlannedTensor], dict[str, Callable[[], dict[str, Tensor]]]]:
    """Output tensors (sorted by name) and, per output name, the producer of its Linear's (or its own) tensors."""
    conv = lookup(ck.fmt, dst)
    plan: list[PlannedTensor] = []
    producers: dict[str, Callable[[], dict[str, Tensor]]] = {}
    scheme = ck.scheme
    dst_layout = target_layout(dst, sym=scheme.sym, g_idx=act_order) if dst in PACKED and scheme else None

    def linear_producer(name: str) -> Callable[[], dict[str, Tensor]]:
        def run() -> dict[str, Tensor]:
            tensors = ck.linear_tensors(name)
            if dst == "hf":
                return {f"{name}.weight": conv.fn(tensors, ck.layout, scheme, dtype)}
            try:
                packed = conv.fn(tensors, ck.layout, dst_layout, dst, scheme, name)
            except NotExact as e:
                raise _not_exact(e) from None
            return {f"{name}.{k}": v for k, v in packed.items()}
        return run

    def plain_producer(key: str, cast: bool) -> Callable[[], dict[str, Tensor]]:
        def run() -> dict[str, Tensor]:
            t = ck.tensor(key)
            return {key: t.to(dtype) if cast and t.is_floating_point() else t}
        return run

    for name, (out_f, in_f) in ck.linears.items():
        run = linear_producer(name)
        if dst == "hf":
            shapes = {"weight": ((out_f, in_f), dtype)}
        else:
            shapes = dst_layout.shapes(out_f, in_f, scheme.bits, scheme.group_size)
        for k, (shape, dt) in shapes.items():
            plan.append(PlannedTensor(f"{name}.{k}", dt, tuple(shape)))
            producers[f"{name}.{k}"] = run
    src_keys = set()
    if ck.layout is not None:
        for name, (out_f, in_f) in ck.linears.items():
            src_keys |= {f"{name}.{k}" for k in ck.layout.shapes(out_f, in_f, scheme.bits, scheme.group_size)}
    cast = dst == "hf"
    for key, info in ck.infos.items():
        if key in src_keys:
            continue
        out_dtype = dtype if cast and info.dtype.is_floating_point else info.dtype
        plan.append(PlannedTensor(key, out_dtype, info.shape))
        producers[key] = plain_producer(key, cast)
    plan.sort(key=lambda p: p.name)
    return plan, producers


def preflight(ck: Checkpoint, dst: str) -> bool:
    """Refuse what cannot be exact before anything is written; returns whether the grid uses act-order."""
    act_order = has_act_order(ck) if ck.fmt in PACKED else False
    if dst == "awq" and ck.scheme is not None:
        if ck.scheme.bits != 4:
            raise QuantkitError(f"{ck.fmt} -> awq: AWQ GEMM stores 4-bit weights only, this checkpoint has "
                                f"{ck.scheme.bits} bits (not exact); closest: --to gptq or --to compressed-tensors")
        if act_order:
            raise QuantkitError(f"{ck.fmt} -> awq: act-order (a non-trivial g_idx) cannot be stored in AWQ (not exact); "
                                "closest: --to compressed-tensors keeps the g_idx")
    return act_order


def convert_folder(ck: Checkpoint, dst: str, out: Path, dtype: torch.dtype = torch.float32,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Write `ck` as `dst` into the (empty, temporary) folder `out`; returns provenance facts.

    `progress("tensors", done, total)` after each tensor written."""
    act_order = preflight(ck, dst)
    plan, producers = _plan(ck, dst, dtype, act_order)
    current: dict[str, Tensor] = {}  # the tensors of the Linear being written: each Linear is converted once
    with StreamingWriter(out / WEIGHTS, plan) as writer:
        for i, p in enumerate(plan):
            if p.name not in current:
                produced = producers[p.name]()
                if len(produced) > 1 or p.name.rsplit(".", 1)[0] in ck.linears:
                    current = produced
                writer.write(p.name, produced[p.name])
            else:
                writer.write(p.name, current.pop(p.name))
            if progress:
                progress("tensors", i + 1, len(plan))
    config = _target_config(ck, dst, dtype, act_order)
    write_json(out / "config.json", config)
    if dst in PACKED:
        for fname, data in get_format("gptq" if dst.startswith("gptq") else dst).side_files(config["quantization_config"]).items():
            write_json(out / fname, data)
    copied = copy_side_files(ck.folder, out, NOT_COPIED)
    return {"tensors": len(plan), "linears": len(ck.linears), "act_order": act_order, "copied_files": copied,
            "bytes_written": sum(p.nbytes for p in plan)}


def check_grid(ck: Checkpoint, dst: str) -> None:
    """Unpack every Linear once and refuse a grid `dst` cannot hold (used by tests and --verify)."""
    for name in ck.linears:
        try:
            check_representable(ck.quantized(name), dst, name)
        except NotExact as e:
            raise _not_exact(e) from None
