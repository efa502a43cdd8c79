"""Activation-aware weight quantization (AWQ, Lin et al. 2023): the search as pure functions, and apply.

Per decoder block, for every scaling mapping (previous op -> Linears it feeds -> module to inspect):
  x_mean = mean |x| per input channel of the Linears, over every calibration token;
  for alpha = k / n_grid, k = 0..n_grid-1: s = x_mean**alpha, normalised so sqrt(max s * min s) = 1;
  score: quantize W*s on the scheme's grid, divide by s again, run the inspect module on the
  calibration inputs and take the mean squared error against its float output; keep the best s.
A scale is folded exactly: the previous op's output is divided by s (norm weight and bias, or the
previous Linear's output rows) and the Linears' input columns are multiplied by s.

Then clipping, per (output channel, group): max |w| shrunk by (1 - i/n_grid) for i < max_shrink*n_grid,
scored by the Linear's own output error. That error is computed exactly from the per-group Gram
matrices X_g^T X_g of every calibration token: err = d^T H_g d for the weight change d of a group,
so the cost does not grow with the token count. q/k projections are not clipped (as in AutoAWQ:
their own output error is not what the attention logits feel).

Cost control: x_mean and the Gram matrices see all tokens; the alpha grid is scored on a fixed
subsample (`score_tokens` random tokens for token-wise modules, whole sequences for attention),
and screened first: every alpha on a quarter of that subsample, then the best SCREEN_KEEP and
alpha 0 (plain RTN, so the choice is never worse than RTN on the objective) on all of it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from quantkit.calib.pipeline import BlockSource, Progress
from quantkit.errors import QuantkitError
from quantkit.grid import fake_quantize, fit_grid
from quantkit.models.arch import ArchSpec, AWQMapping, block_linears, block_mappings, get_arch, get_blocks

log = logging.getLogger(__name__)

_NO_CLIP = ("q_proj", "k_proj", "qkv_proj", "query", "key", "query_key_value", "Wqkv", "c_attn")
_CHUNK_ELEMENTS = 1 << 24  # floats per batched-candidate tensor (64 MiB): bounds the grid's memory


@dataclass(frozen=True)
class AWQConfig:
    """The integer grid and the search's knobs."""

    bits: int
    group_size: int          # -1: one group per output channel
    sym: bool
    n_grid: int = 20
    max_shrink: float = 0.5
    score_tokens: int = 2048  # tokens scoring each alpha, at most 1/4 of the data (attention: whole sequences)
    seed: int = 0
    # "float": the next block is calibrated on this block's float outputs (AutoAWQ, llm-compressor; one
    # pass per block); "quantized": on its quantized outputs (one more pass per block)
    propagate: str = "float"
    screen: bool = True      # screen the alpha grid on a quarter of the scoring sample first

    def meta(self) -> dict[str, str]:
        """Recorded beside a dumped search, checked when it is loaded again."""
        return {k: str(getattr(self, k)) for k in ("bits", "group_size", "sym", "n_grid", "max_shrink",
                                                    "score_tokens", "seed", "propagate", "screen")}


# ---------------------------------------------------------------- grid maths


def group_view(w: Tensor, group_size: int) -> Tensor:
    """(..., out, in) -> (..., out, n_groups, gs)."""
    in_f = w.shape[-1]
    gs = in_f if group_size == -1 else group_size
    return w.reshape(*w.shape[:-1], in_f // gs, gs)


def fake_quant(w: Tensor, cfg: AWQConfig) -> Tensor:
    """Quantize-dequantize (..., out, in) per group on the scheme's min/max grid."""
    g = group_view(w, cfg.group_size)
    scale, zero = fit_grid(g, cfg.bits, cfg.sym)
    return fake_quantize(g, scale, zero, cfg.bits).reshape(w.shape)


def candidate_scales(x_mean: Tensor, n_grid: int) -> Tensor:
    """(C,) mean |x| -> (n_grid, C): s = x_mean**alpha for alpha = k/n_grid, normalised per row."""
    alphas = torch.arange(n_grid, dtype=torch.float32, device=x_mean.device) / n_grid
    s = x_mean.float()[None, :].pow(alphas[:, None]).clamp(min=1e-4)
    return s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()


def scaled_fake_quant(w: Tensor, s: Tensor, cfg: AWQConfig) -> Tensor:
    """w (out, in), s (k, in) -> (k, out, in): Q(w * s) / s, the weight each candidate would act as."""
    return fake_quant(w[None] * s[:, None, :], cfg) / s[:, None, :]


@torch.no_grad()
def search_clip(w: Tensor, gram: Tensor, cfg: AWQConfig) -> Tensor:
    """Best max |w| per (output, group): w (out, in), gram (G, gs, gs) of the Linear's input -> (out, G)."""
    wg = group_view(w.float(), cfg.group_size)                # (out, G, gs)
    org = wg.abs().amax(-1)                                  # (out, G)
    best, best_err = org.clone(), torch.full_like(org, math.inf)
    for i in range(int(cfg.max_shrink * cfg.n_grid)):
        mx = (org * (1 - i / cfg.n_grid))[..., None]
        q = fake_quant(torch.maximum(torch.minimum(wg, mx), -mx).reshape(w.shape), cfg)
        d = (group_view(q, cfg.group_size) - wg).transpose(0, 1)  # (G, out, gs)
        err = ((d @ gram) * d).sum(-1).t()                    # (out, G): d^T H_g d
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, mx[..., 0], best)
    return best


def clip_weight(w: Tensor, max_abs: Tensor, group_size: int) -> Tensor:
    """Clamp each (output, group) of w (out, in) to [-max_abs, max_abs] (max_abs (out, G))."""
    g = group_view(w, group_size)
    m = max_abs.to(w.dtype)[..., None]
    return torch.maximum(torch.minimum(g, m), -m).reshape(w.shape)


SCREEN_KEEP = 3  # candidates re-scored on the whole scoring sample after screening (alpha 0 always is too)


class Evaluator(Protocol):
    """Scores a batch of candidates: one (k, out, in) fake-quantized weight per Linear -> (k,) losses.
    With `screen`, on a quarter of the scoring sample (`screens` says whether that is smaller)."""

    screens: bool

    def __call__(self, w_hats: list[Tensor], screen: bool = False) -> Tensor: ...


@dataclass(frozen=True)
class ScaleChoice:
    scale: Tensor                # (C,) the chosen s
    index: int                   # its alpha is index / n_grid
    losses: dict[int, float]     # alpha index -> loss on the whole scoring sample, for the re-scored ones


@torch.no_grad()
def best_scale(x_mean: Tensor, weights: list[Tensor], evaluate: Evaluator, cfg: AWQConfig) -> ScaleChoice:
    """Grid search over alpha. With `cfg.screen`, every alpha is first scored on a quarter of the
    sample, then the best SCREEN_KEEP and alpha 0 (plain RTN) are scored on all of it; the best wins."""
    cands = candidate_scales(x_mean, cfg.n_grid)
    chunk = max(1, _CHUNK_ELEMENTS // sum(w.numel() for w in weights))

    def score(idx: list[int], screen: bool) -> Tensor:
        sel = cands[idx]
        return torch.cat([evaluate([scaled_fake_quant(w, c, cfg) for w in weights], screen)
                          for c in sel.split(chunk)])

    keep = list(range(cfg.n_grid))
    if cfg.screen and evaluate.screens and cfg.n_grid > SCREEN_KEEP + 1:
        order = torch.argsort(score(keep, True), stable=True)
        keep = sorted({0, *order[:SCREEN_KEEP].tolist()})
    final = score(keep, False)
    best = keep[int(torch.argmin(final))]
    return ScaleChoice(cands[best], best, dict(zip(keep, final.tolist())))


def mixes_tokens(name: str, module: nn.Module) -> bool:
    """Attention modules mix positions: they are scored on whole sequences, not on token subsamples."""
    leaf = name.rsplit(".", 1)[-1].lower()
    return not isinstance(module, nn.Linear) and ("attn" in leaf or "attention" in leaf)


def clip_eligible(name: str) -> bool:
    return name.rsplit(".", 1)[-1] not in _NO_CLIP


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


def search_awq(model: nn.Module, samples: Tensor, cfg: AWQConfig, targets: set[str] | None = None, *,
               device: torch.device, batch_size: int = 8, blocks: BlockSource | None = None,
               progress: Progress | None = None) -> AWQSearch:
    """Search scales and clips block by block on `samples` (n, T) token ids.

    The model is left with the scales folded, the clips applied and the target Linears holding
    their dequantized weights (each block is calibrated on the quantized blocks before it).
    """
    from quantkit.methods.awq_calib import run_awq  # the pipeline side imports this module

    return run_awq(model, samples, cfg, targets, device=device, batch_size=batch_size, blocks=blocks,
                   progress=progress)[0]
