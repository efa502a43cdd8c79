"""AWQ's search result applied: folding scales into the previous op, clipping, and the search as data
(`AWQSearch`, saved with --dump-awq and reapplied with --load-awq).

A scale is folded exactly (`quantkit.methods.scaling`, shared with SmoothQuant): the previous op's output is
divided by s (norm weight and bias, or the previous Linear's output rows) and the Linears' input columns are
multiplied by s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from quantkit.errors import CheckpointError, QuantkitError
from quantkit.formats.safetensors_io import load, metadata, save
from quantkit.methods.awq.search import AWQConfig, clip_weight
from quantkit.methods.scaling import fold_scale, usable_mappings
from quantkit.models.arch import ArchSpec, block_linears, get_arch, get_blocks

log = logging.getLogger(__name__)

__all__ = ["AWQSearch", "AWQDataError", "apply_block", "apply_awq", "save_search", "load_search", "fold_scale",
           "usable_mappings"]


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
