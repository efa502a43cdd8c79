"""AWQ's search result applied: folding scales into the previous op, clipping, and the search as data
(`AWQSearch`, saved with --dump-awq and reapplied with --load-awq).

A scale is folded exactly: the previous op's output is divided by s (norm weight and bias, or the
previous Linear's output rows) and the Linears' input columns are multiplied by s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from quantkit.errors import CheckpointError, QuantkitError
from quantkit.formats.safetensors_io import load, metadata, save
from quantkit.methods.awq.search import AWQConfig, clip_weight
from quantkit.models.arch import ArchSpec, AWQMapping, block_linears, block_mappings, get_arch, get_blocks

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- folding


def fold_scale(block: nn.Module, prev_name: str, linear_names: tuple[str, ...], s: Tensor,
               norm_offset: float = 0.0, compensate: tuple[str, ...] = ()) -> None:
    """Divide the previous op's output by s (C,) and multiply the Linears' input columns by s.

    Exact in real arithmetic: a norm computes x_hat * (offset + w) + b, so (offset + w)/s - offset
    and b/s give its output / s; a previous Linear's output rows (and bias) are divided by s.
    `compensate`: full-precision modules also fed by prev (MoE routers): their weight columns
    are multiplied by s too, so their outputs (the routing) do not change.
    """
    prev = block.get_submodule(prev_name)
    if isinstance(prev, nn.Linear):
        prev.weight.data = prev.weight.data / s.to(prev.weight.dtype)[:, None]
    else:
        prev.weight.data = (prev.weight.data + norm_offset) / s.to(prev.weight.dtype) - norm_offset
    bias = getattr(prev, "bias", None)
    if isinstance(bias, Tensor):
        bias.data = bias.data / s.to(bias.dtype)
    for name in (*linear_names, *compensate):
        lin = block.get_submodule(name)
        lin.weight.data = lin.weight.data * s.to(lin.weight.dtype)[None, :]


def usable_mappings(block: nn.Module, spec: ArchSpec, targets: set[str]) -> list[AWQMapping]:
    """The spec's mappings that apply to this block (names relative to it), in spec order.

    A mapping is skipped when a module is missing, when one of its Linears is not quantized,
    or when widths disagree: e.g. v_proj -> o_proj under GQA, where v_proj's output is narrower
    than o_proj's input (num_kv_heads * head_dim != hidden) and no per-channel scale can fold.
    """
    out = []
    for m in block_mappings(block, spec):
        try:
            prev = block.get_submodule(m.prev)
            lins = [block.get_submodule(n) for n in m.linears]
            block.get_submodule(m.inspect)
            comp = [block.get_submodule(n) for n in m.compensate]
            if m.input:
                block.get_submodule(m.input)
        except AttributeError:
            continue
        if not lins or any(n not in targets for n in m.linears) or not all(isinstance(lin, nn.Linear) for lin in lins):
            continue
        width = lins[0].in_features
        if any(lin.in_features != width for lin in lins):
            continue
        if any(not isinstance(getattr(c, "weight", None), Tensor) or c.weight.shape[-1] != width for c in comp):
            continue
        if isinstance(prev, nn.Linear):
            if prev.out_features != width:
                log.debug("awq: skipping %s -> %s (widths %d != %d)", m.prev, m.linears, prev.out_features, width)
                continue
        elif not isinstance(getattr(prev, "weight", None), Tensor) or tuple(prev.weight.shape) != (width,):
            continue
        out.append(m)
    return out


# ---------------------------------------------------------------- search result, apply


@dataclass
class AWQSearch:
    """The search's result as plain data, keyed by full module name.

    scales: previous op -> (C,) float32 s, divided out of it and multiplied into the Linears it feeds
    clips:  Linear -> (out, n_groups) float32 max |w| per group, in the scaled weight space
    meta:   the grid it was searched for (bits, group_size, sym) and the search knobs
    """

    scales: dict[str, Tensor] = field(default_factory=dict)
    clips: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        out = {f"scale:{k}": v.float().contiguous().cpu() for k, v in self.scales.items()}
        out.update({f"clip:{k}": v.float().contiguous().cpu() for k, v in self.clips.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, str]) -> "AWQSearch":
        res = cls(meta=dict(meta))
        for key, t in tensors.items():
            kind, _, name = key.partition(":")
            if kind not in ("scale", "clip") or not name:
                raise AWQDataError(f"AWQ search file holds an unexpected tensor {key!r}; was it written by --dump-awq?")
            (res.scales if kind == "scale" else res.clips)[name] = t.float()
        return res


class AWQDataError(QuantkitError):
    """An AWQ search result that does not fit the model or scheme."""


def apply_block(block: nn.Module, spec: ArchSpec, targets: set[str], scales: dict[str, Tensor],
                clips: dict[str, Tensor], group_size: int) -> None:
    """Fold scales (spec order) then clip, for one block; names relative to it. Search and
    --load-awq both go through here, so both produce the same float weights bit for bit."""
    for m in usable_mappings(block, spec, targets):
        if m.prev in scales:
            s = scales[m.prev].to(block.get_submodule(m.linears[0]).weight.device)
            fold_scale(block, m.prev, m.linears, s, m.norm_offset, m.compensate)
    for name in block_linears(block, spec):
        if name in clips:
            lin = block.get_submodule(name)
            lin.weight.data = clip_weight(lin.weight.data, clips[name].to(lin.weight.device), group_size)


def _check(search: AWQSearch, model: nn.Module, spec: ArchSpec, targets: set[str], cfg: AWQConfig) -> None:
    want = {"bits": str(cfg.bits), "group_size": str(cfg.group_size), "sym": str(cfg.sym)}
    for k, v in want.items():
        if k in search.meta and search.meta[k] != v:
            raise AWQDataError(f"the AWQ search file was made for {k}={search.meta[k]}, not {v}; "
                               f"quantize with the same scheme or search again")
    blocks = get_blocks(model, spec)
    prevs = {f"{spec.blocks}.{i}.{m.prev}": (i, m)
             for i, b in enumerate(blocks) for m in usable_mappings(b, spec, _relative(targets, spec, i))}
    for name, s in search.scales.items():
        if name not in prevs:
            raise AWQDataError(f"the AWQ search file scales {name}, which feeds no quantized Linear of this model; "
                               f"was it searched on another model or with another --skip?")
        i, m = prevs[name]
        width = blocks[i].get_submodule(m.linears[0]).in_features
        if tuple(s.shape) != (width,):
            raise AWQDataError(f"the AWQ search file's scale for {name} has shape {tuple(s.shape)}, expected ({width},)")
    for name, c in search.clips.items():
        if name not in targets:
            raise AWQDataError(f"the AWQ search file clips {name}, which is not a quantized Linear of this model")
        lin = model.get_submodule(name)
        shape = (lin.out_features, 1 if cfg.group_size == -1 else lin.in_features // cfg.group_size)
        if tuple(c.shape) != shape:
            raise AWQDataError(f"the AWQ search file's clip for {name} has shape {tuple(c.shape)}, expected {shape}")


def _relative(names: set[str], spec: ArchSpec, i: int) -> set[str]:
    prefix = f"{spec.blocks}.{i}."
    return {n.removeprefix(prefix) for n in names if n.startswith(prefix)}


def apply_awq(model: nn.Module, search: AWQSearch, cfg: AWQConfig | None = None,
              targets: set[str] | None = None) -> None:
    """Fold the searched scales and clip the weights of a float model, in place.

    `cfg`: the scheme it will be quantized with (checked against the search's; default: the search's own).
    `targets`: full names of the Linears to be quantized (default: every block Linear).
    """
    if cfg is None:
        try:
            m = search.meta
            cfg = AWQConfig(bits=int(m["bits"]), group_size=int(m["group_size"]), sym=m["sym"] == "True")
        except (KeyError, ValueError):
            raise AWQDataError("the AWQ search holds no grid description (bits, group_size, sym); "
                               "pass the scheme's AWQConfig") from None
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    if targets is None:
        targets = {f"{spec.blocks}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b, spec)}
    _check(search, model, spec, targets, cfg)
    for i, block in enumerate(blocks):
        prefix = f"{spec.blocks}.{i}."
        scales = {k.removeprefix(prefix): v for k, v in search.scales.items() if k.startswith(prefix)}
        clips = {k.removeprefix(prefix): v for k, v in search.clips.items() if k.startswith(prefix)}
        apply_block(block, spec, _relative(targets, spec, i), scales, clips, cfg.group_size)


def save_search(search: AWQSearch, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(search.tensors(), path, {"format": "quantkit-awq", **search.meta})


def load_search(path: Path) -> AWQSearch:
    path = Path(path)
    if not path.is_file():
        raise AWQDataError(f"AWQ search file {path} does not exist; create it with --dump-awq")
    try:
        tensors, meta = load(path), metadata(path)
    except CheckpointError as e:
        raise AWQDataError(f"cannot read AWQ search file: {e}") from None
    if meta.get("format") != "quantkit-awq":
        raise AWQDataError(f"{path} is not an AWQ search file written by --dump-awq")
    return AWQSearch.from_tensors(tensors, {k: v for k, v in meta.items() if k != "format"})
