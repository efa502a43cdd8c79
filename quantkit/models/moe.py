"""Mixture-of-experts models: fused experts -> per-expert Linears, hub tensor names, expert coverage.

transformers 5 keeps a sparse MoE block's experts fused in one module holding 3-D
parameters, gate_up_proj (E, 2*I, H) (gate rows first) and down_proj (E, H, I),
called as experts(hidden (N, H), top_k_index (N, K), top_k_weights (N, K)) -> (N, H).
`swap_experts` replaces that module by `PerExpertMoE`: the same call, the same
maths, but one `ExpertMLP` per expert with its own gate_proj / up_proj / down_proj
`nn.Linear`s (names experts.{e}.gate_proj, ...). Every quantkit method then sees
ordinary Linears, and each expert Linear runs only on the tokens routed to it, so
its calibration statistics (GPTQ Hessian, AWQ |x| means and Gram matrices) come
from exactly those tokens.

Checkpoints keep the hub's per-expert names (what vLLM's MoE loaders, existing GPTQ
MoE checkpoints and transformers' conversion mapping read): `to_hub_names` and
`from_hub_names` translate, driven by the architecture table's `MoESpec`.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from quantkit.errors import ModelSourceError
from quantkit.models.arch import ARCHITECTURES, ArchSpec, MoESpec, find_arch, get_blocks

log = logging.getLogger(__name__)

T = TypeVar("T")


class ExpertMLP(nn.Module):
    """One expert: down_proj(act(gate_proj(x)) * up_proj(x)); x (n, H) -> (n, H)."""

    def __init__(self, hidden: int, inter: int, act_fn: nn.Module, device: Any = None, dtype: Any = None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertMoE(nn.ModuleList):
    """Drop-in for transformers' fused experts module, one `ExpertMLP` child per expert (0..E-1).

    `all_tokens` (set by `ExpertCoverage.statistics` for --moe-calibration all): every expert
    runs on every token, so hooks on its Linears see all of them, while the output still
    combines only the routed (token, expert) pairs, with the router's weights.
    """

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.all_tokens = False

    @classmethod
    def from_fused(cls, fused: nn.Module) -> "PerExpertMoE":
        """The same experts as `fused` (weights copied; on the meta device, shapes only)."""
        gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
        if not (isinstance(gate_up, Tensor) and isinstance(down, Tensor) and gate_up.dim() == down.dim() == 3) \
                or getattr(fused, "is_transposed", False) or not getattr(fused, "is_concatenated", True) \
                or getattr(fused, "has_bias", False):
            raise ModelSourceError(f"the experts module {type(fused).__name__} is not laid out as gate_up_proj "
                                   f"(E, 2*I, H) and down_proj (E, H, I); this MoE architecture is not supported yet")
        n, two_inter, hidden = gate_up.shape
        inter = two_inter // 2
        experts = [ExpertMLP(hidden, inter, copy.deepcopy(fused.act_fn), gate_up.device, gate_up.dtype)
                   for _ in range(n)]
        if not gate_up.is_meta:
            with torch.no_grad():
                for e, ex in enumerate(experts):
                    ex.gate_proj.weight.copy_(gate_up[e, :inter])
                    ex.up_proj.weight.copy_(gate_up[e, inter:])
                    ex.down_proj.weight.copy_(down[e])
        return cls(experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            # (top-k slot, token) pairs routed to e, in the order the fused module visits them
            slot, token = torch.where(top_k_index.t() == e)
            if self.all_tokens:
                y = expert(hidden_states)[token]
            elif token.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _moe_spec(model: nn.Module, spec: ArchSpec | None) -> ArchSpec | None:
    spec = spec or find_arch(model)
    return spec if spec is not None and spec.moe is not None else None


def moe_layers(model: nn.Module, spec: ArchSpec | None = None) -> list[int]:
    """Indices of the blocks whose experts are per-expert (after `swap_experts`)."""
    spec = _moe_spec(model, spec)
    if spec is None:
        return []
    out = []
    for i, block in enumerate(get_blocks(model, spec)):
        try:
            if isinstance(block.get_submodule(spec.moe.experts_path), PerExpertMoE):
                out.append(i)
        except AttributeError:
            continue  # a dense block (Qwen MoE's mlp_only_layers)
    return out


def swap_experts(model: nn.Module, spec: ArchSpec | None = None) -> int:
    """Replace every fused experts module by an equivalent `PerExpertMoE`, in place; returns how many.

    Idempotent, and a no-op for dense architectures. Works on meta-device skeletons too.
    """
    spec = _moe_spec(model, spec)
    if spec is None:
        return 0
    moe, n = spec.moe, 0
    expected = getattr(model.config, moe.num_experts, None)
    for i, block in enumerate(get_blocks(model, spec)):
        try:
            fused = block.get_submodule(moe.experts_path)
        except AttributeError:
            continue
        if isinstance(fused, PerExpertMoE):
            continue
        swapped = PerExpertMoE.from_fused(fused)
        if expected is not None and len(swapped) != expected:
            raise ModelSourceError(f"block {i} holds {len(swapped)} experts but config {moe.num_experts} says "
                                   f"{expected}; the checkpoint does not match its config.json")
        setattr(block.get_submodule(moe.module), moe.experts, swapped)
        n += 1
    if n:
        log.debug("moe: %d blocks now hold per-expert Linears", n)
    return n


def moe_architecture(config: dict[str, Any]) -> str | None:
    """The MoE architecture a config.json names (from the table), or None for dense or unknown models."""
    for name in config.get("architectures") or []:
        spec = ARCHITECTURES.get(name)
        if spec is not None and spec.moe is not None:
            return name
    return None


# ---------------------------------------------------------------- hub tensor names


def block_to_hub(moe: MoESpec, rel: str) -> str:
    """A tensor name relative to an MoE block -> the hub checkpoint's (Mixtral: mlp.experts.0.gate_proj.qweight
    -> block_sparse_moe.experts.0.w1.qweight); names outside the MoE module are unchanged."""
    head = moe.module + "."
    if not rel.startswith(head):
        return rel
    rest = rel[len(head):]
    parts = rest.split(".", 3)  # experts, e, leaf, tail
    if len(parts) >= 3 and parts[0] == moe.experts and parts[1].isdigit():
        parts[2] = dict(moe.hub_linears).get(parts[2], parts[2])
        rest = ".".join(parts)
    return f"{moe.hub_module}.{rest}"


def block_from_hub(moe: MoESpec, tensors: dict[str, T]) -> dict[str, T]:
    """Tensors relative to an MoE block, hub names (or transformers' fused 3-D experts) -> module names."""
    inverse = {hub: ours for ours, hub in moe.hub_linears}
    head, fused = moe.hub_module + ".", f"{moe.experts_path}."
    out: dict[str, T] = {}
    for rel, t in tensors.items():
        if rel.startswith(head):
            parts = rel[len(head):].split(".", 3)
            if len(parts) >= 3 and parts[0] == moe.experts and parts[1].isdigit():
                parts[2] = inverse.get(parts[2], parts[2])
            rel = f"{moe.module}.{'.'.join(parts)}"
        leaf = rel.removeprefix(fused)
        if rel.startswith(fused) and leaf in ("gate_up_proj", "down_proj") and isinstance(t, Tensor) and t.dim() == 3:
            for e in range(t.shape[0]):  # a fused checkpoint: split it per expert
                if leaf == "down_proj":
                    out[f"{fused}{e}.down_proj.weight"] = t[e]
                else:
                    gate, up = t[e].chunk(2, dim=0)
                    out[f"{fused}{e}.gate_proj.weight"], out[f"{fused}{e}.up_proj.weight"] = gate, up
            continue
        out[rel] = t
    return out


def _by_block(model: nn.Module, spec: ArchSpec, names: list[str]) -> dict[str, tuple[int, str]]:
    """Full name -> (block index, name relative to the block) for names inside an MoE block."""
    layers = set(moe_layers(model, spec))
    pat = re.compile(re.escape(spec.blocks) + r"\.(\d+)\.(.+)")
    out = {}
    for n in names:
        m = pat.fullmatch(n)
        if m and int(m.group(1)) in layers:
            out[n] = (int(m.group(1)), m.group(2))
    return out


def to_hub_names(model: nn.Module, tensors: dict[str, T]) -> dict[str, T]:
    """Checkpoint tensors named after the model's modules -> the hub's per-expert names (a no-op if dense)."""
    spec = _moe_spec(model, None)
    if spec is None:
        return tensors
    inside = _by_block(model, spec, list(tensors))
    out = {}
    for name, t in tensors.items():
        if name in inside:
            i, rel = inside[name]
            name = f"{spec.blocks}.{i}.{block_to_hub(spec.moe, rel)}"
        out[name] = t
    return out


def from_hub_names(model: nn.Module, tensors: dict[str, T]) -> dict[str, T]:
    """The inverse of `to_hub_names`, for a model whose experts were swapped (fused 3-D tensors are split too)."""
    spec = _moe_spec(model, None)
    if spec is None:
        return tensors
    inside = _by_block(model, spec, list(tensors))
    per_block: dict[int, dict[str, T]] = {}
    out: dict[str, T] = {}
    for name, t in tensors.items():
        if name in inside:
            i, rel = inside[name]
            per_block.setdefault(i, {})[rel] = t
        else:
            out[name] = t
    for i, rel_tensors in per_block.items():
        out.update({f"{spec.blocks}.{i}.{k}": v for k, v in block_from_hub(spec.moe, rel_tensors).items()})
    return out


# ---------------------------------------------------------------- expert coverage

TOKENS = ":moe_tokens"  # side-result key suffix: an experts module's (2, n) expert indices and token counts


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass
class ExpertCoverage:
    """How many calibration tokens each expert's statistics saw, and which experts fell back to RTN.

    mode "routed": an expert sees the tokens the router sends it; "all": every token (the block's
    output still follows the router). An expert with fewer than `min_tokens` is quantized with RTN.
    """

    mode: str = "routed"
    min_tokens: int = 16
    tokens: dict[str, dict[int, int]] = field(default_factory=dict)  # experts module (full name) -> expert -> tokens
    fallback: list[str] = field(default_factory=list)                # full expert names, in the order met

    @contextmanager
    def statistics(self, module: nn.Module) -> Iterator[None]:
        """While open, in "all" mode, the experts under `module` run on every token."""
        mods = [m for m in module.modules() if isinstance(m, PerExpertMoE)] if self.mode == "all" else []
        for m in mods:
            m.all_tokens = True
        try:
            yield
        finally:
            for m in mods:
                m.all_tokens = False

    def enough(self, expert: str, tokens: int) -> bool:
        """Record that `expert` ("model.layers.3.mlp.experts.5") saw `tokens` tokens. False if that is too
        few to calibrate on (never fewer than one): the caller quantizes it with RTN; warned once per expert."""
        parent, _, idx = expert.rpartition(".")
        self.tokens.setdefault(parent, {}).setdefault(int(idx), tokens)
        if tokens >= max(self.min_tokens, 1):
            return True
        if expert not in self.fallback:
            self.fallback.append(expert)
            log.warning("%s saw %d calibration token(s), fewer than --moe-min-tokens %d: quantized with RTN "
                        "(more --nsamples or --moe-calibration all reach it)", expert, tokens, self.min_tokens)
        return False

    def starved(self, prefix: str, tokens: dict[str, int]) -> set[str]:
        """Record a block's experts (name relative to block `prefix` -> tokens); returns those too few reached."""
        return {e for e, n in tokens.items() if not self.enough(prefix + e, n)}

    def block_results(self, prefix: str) -> dict[str, Tensor]:
        """The counts recorded in block `prefix` ("model.layers.3.") as side results keyed relative to it:
        a resumable run keeps them on disk with the block, so a resumed run reports every block."""
        return {name.removeprefix(prefix) + TOKENS: torch.tensor([sorted(per), [per[e] for e in sorted(per)]])
                for name, per in self.tokens.items() if name.startswith(prefix)}

    def absorb(self, results: dict[str, Any]) -> dict[str, Any]:
        """`results` (full names) without the `block_results` entries, whose counts are recorded (blocks a
        resumed run did not calibrate again come back this way; their RTN fallbacks follow from the counts)."""
        out = {}
        for name, value in results.items():
            if name.endswith(TOKENS):
                for e, n in zip(*value.tolist(), strict=True):
                    self.enough(f"{name.removesuffix(TOKENS)}.{e}", n)
            else:
                out[name] = value
        return out

    def summary(self) -> dict[str, Any] | None:
        """JSON for the --json summary and quantkit.json (blocks in model order); None when no expert was calibrated."""
        if not self.tokens:
            return None
        names = sorted(self.tokens, key=_natural)
        layers = {name: [self.tokens[name][e] for e in sorted(self.tokens[name])] for name in names}
        low_name, low_e = min(((n, e) for n in names for e in sorted(self.tokens[n])),  # ties: the first in model order
                              key=lambda k: self.tokens[k[0]][k[1]])
        return {"mode": self.mode, "min_tokens": self.min_tokens, "tokens": layers,
                "min": self.tokens[low_name][low_e], "min_expert": f"{low_name}.{low_e}",
                "rtn_fallback": sorted(self.fallback, key=_natural)}

