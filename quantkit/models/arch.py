"""Architecture knowledge as data: one table keyed by the Hugging Face architecture name.

Each entry says where the decoder blocks are, which Linears each block holds
and in what order they run (true-sequential groups: Linears in one group see
the same input), and the AWQ scaling mappings (previous op -> Linears it feeds,
and the module whose output measures the error).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.errors import UnknownNameError


@dataclass(frozen=True)
class AWQMapping:
    prev: str                # module whose output feeds `linears` (a norm or a Linear), relative to the block
    linears: tuple[str, ...]  # Linears scaled together
    inspect: str             # module whose output error scores a scale (the Linears' parent, or the Linear itself)
    norm_offset: float = 0.0  # Gemma norms compute x * (offset + weight): fold scales accordingly


@dataclass(frozen=True)
class ArchSpec:
    blocks: str                            # dotted path of the ModuleList of decoder blocks
    sequential: tuple[tuple[str, ...], ...]  # Linear names per block, in execution order, grouped by shared input
    awq: tuple[AWQMapping, ...] = ()
    per_layer_kwargs: bool = False         # blocks get different kwargs (sliding/global attention): capture each
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


_LLAMA = ArchSpec("model.layers", _LLAMA_SEQ, _llama_awq())
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
        notes="fused qkv and gate_up: v->o and up->down cannot be scaled without splitting",
    ),
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


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """The block's Linears named in the spec that exist (e.g. no bias-only variants), in run order."""
    out = {}
    for name in spec.linears:
        try:
            mod = block.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear):
            out[name] = mod
    return out
