"""Architecture knowledge as data: one table keyed by the Hugging Face architecture name.

Each entry says where the decoder blocks are, which Linears each block holds
and in what order they run (true-sequential groups: Linears in one group see
the same input), and the AWQ scaling mappings (previous op -> Linears it feeds,
and the module whose output measures the error).

Mixture-of-experts blocks: a `*` in a name stands for every expert index of the
module list before it ("mlp.experts.*.gate_proj" -> "mlp.experts.0.gate_proj", ...).
transformers stores the experts fused as 3-D parameters; `quantkit.models.moe`
swaps them for per-expert Linears first, so the patterns expand per block. A
sequential group with `*` becomes one group per expert, and those groups form one
stage (independent inputs: one calibration pass serves them all). An AWQ mapping
whose `prev` has `*` becomes one mapping per expert; otherwise its `*` Linears
expand in place (one norm feeds every expert).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from quantkit.errors import UnknownNameError


@dataclass(frozen=True)
class AWQMapping:
    prev: str                # module whose output feeds `linears` (a norm or a Linear), relative to the block
    linears: tuple[str, ...]  # Linears scaled together
    inspect: str             # module whose output error scores a scale (the Linears' parent, or the Linear itself)
    norm_offset: float = 0.0  # Gemma norms compute x * (offset + weight): fold scales accordingly
    input: str = ""          # module whose input x gives mean |x| (default: the first Linear; MoE: the MoE block,
    #                          since each expert sees only its routed tokens while the norm feeds all of them)
    compensate: tuple[str, ...] = ()  # full-precision modules also fed by `prev` (routers): their weight columns are
    #                                   multiplied by s so their output (the routing) is unchanged


@dataclass(frozen=True)
class MoESpec:
    """A sparse MoE block: where the fused experts and the router sit, and the hub checkpoint's names."""

    module: str = "mlp"                 # the MoE block, relative to a decoder block
    experts: str = "experts"            # fused experts in it: gate_up_proj (E, 2*I, H), down_proj (E, H, I)
    router: str = "gate"                # router (E, H) weight: kept in full precision
    num_experts: str = "num_experts"    # config attribute holding E
    shared_expert: str | None = None    # an always-on dense MLP beside the experts (ordinary, quantized Linears)
    keep_float: tuple[str, ...] = ()    # other full-precision modules of the MoE block (shared-expert gate)
    hub_module: str = "mlp"             # the MoE block's name in hub checkpoints
    # per-expert Linear -> its name in hub checkpoints: experts.{e}.<hub name>.weight
    hub_linears: tuple[tuple[str, str], ...] = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"),
                                                ("down_proj", "down_proj"))

    @property
    def experts_path(self) -> str:
        return f"{self.module}.{self.experts}"


@dataclass(frozen=True)
class Residual:
    """Where a pre-norm decoder block reads and writes its residual stream (quantkit.models.rotation fuses a
    rotation of the stream into these weights). Names are relative to a block, `final_norm` to the model."""

    readers: tuple[tuple[str, tuple[str, ...]], ...]  # (norm, the Linears reading its output)
    writers: tuple[str, ...]                          # Linears whose outputs are added to the stream
    final_norm: str = "model.norm"
    norm_offset: float = 0.0                          # norms computing x * (offset + weight)


@dataclass(frozen=True)
class ArchSpec:
    blocks: str                            # dotted path of the ModuleList of decoder blocks
    sequential: tuple[tuple[str, ...], ...]  # Linear names per block, in execution order, grouped by shared input
    awq: tuple[AWQMapping, ...] = ()
    per_layer_kwargs: bool = False         # blocks get different kwargs (sliding/global attention): capture each
    moe: MoESpec | None = None             # sparse MoE blocks (names with `*` in `sequential` and `awq`)
    residual: Residual | None = None       # pre-norm residual stream (a fused rotation applies); None: refused
    notes: str = ""

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for group in self.sequential for n in group)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_SEQ = (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _llama_awq(mlp_norm: str = "post_attention_layernorm", offset: float = 0.0) -> tuple[AWQMapping, ...]:
    return (
        AWQMapping("input_layernorm", _ATTN, "self_attn", offset),
        AWQMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        AWQMapping(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp", offset),
        AWQMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )


_LLAMA_RESIDUAL = Residual((("input_layernorm", _ATTN), ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
                           ("self_attn.o_proj", "mlp.down_proj"))
_LLAMA = ArchSpec("model.layers", _LLAMA_SEQ, _llama_awq(), residual=_LLAMA_RESIDUAL)

# Sparse MoE (transformers 5 layout): routed experts after the attention, one router kept in float.
_EXPERTS = (("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), ("mlp.experts.*.down_proj",))
_SHARED = (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))
_EXPERTS_DOWN = AWQMapping("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), "mlp.experts.*.down_proj")


def _moe_awq(shared: bool, dense: bool) -> tuple[AWQMapping, ...]:
    """Attention as Llama; the norm feeds every expert (and the shared expert) with the router (and the
    shared-expert gate) compensated, as AutoAWQ maps Mixtral; then each expert's up -> down.
    `dense`: some blocks may hold a plain MLP instead (Qwen MoE's mlp_only_layers): Llama's MLP mappings."""
    llama = _llama_awq()
    gates = ("mlp.gate", "mlp.shared_expert_gate") if shared else ("mlp.gate",)
    moe_in = AWQMapping("post_attention_layernorm", (*(_SHARED[0] if shared else ()), *_EXPERTS[0]), "mlp",
                        input="mlp", compensate=gates)
    shared_down = AWQMapping("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",),
                             "mlp.shared_expert.down_proj")
    return (*llama[:2], *(llama[2:] if dense else ()), moe_in, *((shared_down,) if shared else ()), _EXPERTS_DOWN)


_MIXTRAL = ArchSpec(
    "model.layers", (_ATTN, ("self_attn.o_proj",), *_EXPERTS), _moe_awq(shared=False, dense=False),
    moe=MoESpec(num_experts="num_local_experts", hub_module="block_sparse_moe",
                hub_linears=(("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))),
    notes="hub checkpoints: block_sparse_moe.experts.{e}.w1/w3/w2 (gate/up/down), block_sparse_moe.gate",
)
_QWEN3_MOE = ArchSpec("model.layers", (*_LLAMA_SEQ, *_EXPERTS), _moe_awq(shared=False, dense=True), moe=MoESpec())
_QWEN2_MOE = ArchSpec(
    "model.layers", (*_LLAMA_SEQ, *_SHARED, *_EXPERTS), _moe_awq(shared=True, dense=True),
    moe=MoESpec(shared_expert="shared_expert", keep_float=("shared_expert_gate",)),
    notes="the shared expert runs before the routed ones; its sigmoid gate stays in full precision",
)
_GEMMA = ArchSpec("model.layers", _LLAMA_SEQ, _llama_awq("pre_feedforward_layernorm", 1.0), per_layer_kwargs=True)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
    "Phi3ForCausalLM": ArchSpec(
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        (
            AWQMapping("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            AWQMapping("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ),
        residual=Residual((("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
                          ("self_attn.o_proj", "mlp.down_proj")),
        notes="fused qkv and gate_up: v->o and up->down cannot be scaled without splitting",
    ),
    "MixtralForCausalLM": _MIXTRAL,
    "Qwen2MoeForCausalLM": _QWEN2_MOE,
    "Qwen3MoeForCausalLM": _QWEN3_MOE,
    "OPTForCausalLM": ArchSpec(
        "model.decoder.layers",
        (_ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        (
            AWQMapping("self_attn_layer_norm", _ATTN, "self_attn"),
            AWQMapping("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            AWQMapping("final_layer_norm", ("fc1",), "fc1"),
            AWQMapping("fc1", ("fc2",), "fc2"),
        ),
    ),
}


def architecture_name(model: nn.Module) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return archs[0]


def get_arch(model: nn.Module) -> ArchSpec:
    name = architecture_name(model)
    if name not in ARCHITECTURES:
        raise UnknownNameError(
            f"architecture {name} is not supported yet; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.blocks)


def find_arch(model: nn.Module) -> ArchSpec | None:
    """The table's entry for the model, or None (readers that handle any architecture)."""
    return ARCHITECTURES.get(architecture_name(model))


# ---------------------------------------------------------------- `*` patterns, expanded per block


def expert_indices(block: nn.Module, pattern: str) -> list[str]:
    """The child names (0, 1, ...) a `*` in `pattern` stands for in this block; none if the list is absent."""
    head = pattern.split(".*", 1)[0]
    try:
        container = block.get_submodule(head)
    except AttributeError:
        return []
    return [k for k, _ in container.named_children() if k.isdigit()]


def _expand_each(block: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    """Every `*` name replaced, in place, by its names for all expert indices."""
    out: list[str] = []
    for n in names:
        out.extend(n.replace("*", i) for i in expert_indices(block, n)) if "*" in n else out.append(n)
    return tuple(out)


def block_stages(block: nn.Module, spec: ArchSpec) -> list[list[tuple[str, ...]]]:
    """The block's true-sequential groups, as stages: a `*` group gives one group per expert, all in one stage."""
    stages = []
    for group in spec.sequential:
        pats = [n for n in group if "*" in n]
        if not pats:
            stages.append([group])
        elif idx := expert_indices(block, pats[0]):
            stages.append([tuple(n.replace("*", i) for n in group) for i in idx])
    return stages


def block_mappings(block: nn.Module, spec: ArchSpec) -> list[AWQMapping]:
    """The spec's AWQ mappings with `*` expanded for this block (see the module docstring)."""
    out = []
    for m in spec.awq:
        if "*" in m.prev:
            for i in expert_indices(block, m.prev):
                r = lambda n, i=i: n.replace("*", i)  # noqa: E731
                out.append(replace(m, prev=r(m.prev), linears=tuple(map(r, m.linears)), inspect=r(m.inspect),
                                   input=r(m.input), compensate=tuple(map(r, m.compensate))))
        elif any("*" in n for n in m.linears):
            if any(expert_indices(block, n) for n in m.linears if "*" in n):  # experts in this block
                out.append(replace(m, linears=_expand_each(block, m.linears)))
        else:
            out.append(m)
    return out


def expert_of(spec: ArchSpec, name: str) -> str | None:
    """The expert a Linear belongs to ("mlp.experts.5" for "mlp.experts.5.gate_proj"), or None."""
    for group in spec.sequential:
        for pat in group:
            if "*" in pat:
                head, _, tail = pat.partition("*")
                if m := re.fullmatch(re.escape(head) + r"(\d+)" + re.escape(tail), name):
                    return head + m.group(1)
    return None


def blocks_linears(model: nn.Module, spec: ArchSpec, skips: Callable[[str], bool]) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks whose full name `skips` does not refuse, by full name, in run order."""
    out = {}
    for i, block in enumerate(get_blocks(model, spec)):
        for name, mod in block_linears(block, spec).items():
            full = f"{spec.blocks}.{i}.{name}"
            if not skips(full):
                out[full] = mod
    return out


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """The block's Linears named in the spec that exist (e.g. no bias-only variants), in run order
    (MoE: stage order, every expert's gate/up then every down; the experts themselves run one after another)."""
    out = {}
    for name in (n for stage in block_stages(block, spec) for group in stage for n in group):
        try:
            mod = block.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear):
            out[name] = mod
    return out
