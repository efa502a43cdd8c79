"""What llama.cpp's convert_hf_to_gguf.py does for each Hugging Face architecture quantkit exports, as data.

`GGUF_ARCHS` maps an HF class to an `ArchSpec`: the llama.cpp architecture, how tensor values
change on the way (the q/k rotary permutation of Llama/Mistral; Gemma's norm shift, since
Gemma stores w and computes x * (1 + w) where llama.cpp multiplies by the stored value), which
hyperparameter keys the converter writes, and the configurations llama.cpp would run
differently from transformers (refused, one line each).

Gemma 3 facts (llama.cpp src/models/gemma3.cpp): NEOX rope, so no q/k permutation; the input
embedding is scaled by sqrt(n_embd) in the graph (nothing stored); the attention scale is
1/sqrt(head_dim), or 1/sqrt(n_embd/n_head) for the 62-layer (27B) model, and
query_pre_attn_scalar is not read, so a config whose scalar gives another scale is refused;
sliding-window layers follow the period-6 pattern unless the file says otherwise, and take
rope.freq_base_swa with scale 1; the output is token_embd when output.weight is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gguf import MODEL_ARCH, GGUFWriter, RopeScalingType

Config = dict[str, Any]


def rope_params(cfg: Config, kind: str = "full_attention") -> Config:
    """The rope parameters of `kind` layers, for flat (rope_theta / rope_scaling) and per-layer-type configs."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return params.get(kind, params)


def rope_theta(cfg: Config, default: float = 10000.0) -> float:
    return float(rope_params(cfg).get("rope_theta", cfg.get("rope_theta", default)))


def rope_scaling(params: Config) -> Config | None:
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind in (None, "default") else params


def head_dim(cfg: Config) -> int:
    return int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))


def _llama_keys(w: GGUFWriter, cfg: Config) -> None:
    """LlamaModel / Qwen2Model's keys: rope dimension count, vocab size, head length when head_dim is explicit."""
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(head_dim(cfg))
    if cfg.get("head_dim") is not None or head_dim(cfg) != hidden // heads:
        w.add_key_length(head_dim(cfg))
        w.add_value_length(head_dim(cfg))
    w.add_vocab_size(int(cfg["vocab_size"]))


def _llama_checks(cfg: Config) -> list[str]:
    scaling = rope_scaling(rope_params(cfg))
    return [f"rope scaling {scaling!r}"] if scaling is not None else []


def sliding_layers(cfg: Config) -> list[bool]:
    """Which layers use sliding-window attention, from layer_types or the older sliding_window_pattern."""
    n = int(cfg["num_hidden_layers"])
    if cfg.get("layer_types"):
        return [t == "sliding_attention" for t in cfg["layer_types"]]
    period = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return [bool((i + 1) % period) for i in range(n)]


def llamacpp_default_swa(n_layer: int, period: int = 6) -> list[bool]:
    """llama.cpp's set_swa_pattern(period): every period-th layer is global, the others slide."""
    return [i % period < period - 1 for i in range(n_layer)]


def _gemma3_keys(w: GGUFWriter, cfg: Config) -> None:
    """Gemma3Model's keys (after TextModel's): head length always, both rope bases, the sliding window."""
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_context_length(int(cfg.get("max_position_embeddings", 131072)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg.get("num_attention_heads", 8)))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads", 4)))
    full = rope_params(cfg, "full_attention")
    if (scaling := rope_scaling(full)) is not None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_rope_freq_base(float(full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))))
    local = rope_params(cfg, "sliding_attention")
    w.add_rope_freq_base_swa(float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_key_length(int(cfg.get("head_dim", 256)))
    w.add_value_length(int(cfg.get("head_dim", 256)))
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    swa = sliding_layers(cfg)
    if any(swa):
        w.add_sliding_window(int(cfg["sliding_window"]))
        if swa != llamacpp_default_swa(len(swa)):
            w.add_sliding_window_pattern(swa)  # llama.cpp reads the per-layer array before its period-6 default


def _gemma3_checks(cfg: Config) -> list[str]:
    out = []
    if cfg.get("attn_logit_softcapping") is not None:
        out.append("attention logit soft-capping (llama.cpp's Gemma 3 graph has none)")
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        out.append(f"hidden_activation {cfg['hidden_activation']!r} (llama.cpp runs tanh-approximated GELU)")
    if cfg.get("use_bidirectional_attention"):
        out.append("bidirectional attention (an embedding model)")
    n_layer, hd = int(cfg["num_hidden_layers"]), int(cfg.get("head_dim", 256))
    theirs = int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]) if n_layer == 62 else hd
    scalar = float(cfg.get("query_pre_attn_scalar", 256))
    if abs(scalar - theirs) > 1e-6 * theirs:
        out.append(f"query_pre_attn_scalar {scalar:g} (llama.cpp scales queries by 1/sqrt({theirs}) and reads no "
                   "scalar)")
    full, local = rope_params(cfg, "full_attention"), rope_params(cfg, "sliding_attention")
    scaling = rope_scaling(full)
    if scaling is not None and (scaling.get("rope_type", scaling.get("type")) != "linear" or "factor" not in scaling):
        out.append(f"rope scaling {scaling!r} on global layers (llama.cpp's Gemma 3 takes linear only)")
    if local is not full and rope_scaling(local) is not None:
        out.append(f"rope scaling {rope_scaling(local)!r} on sliding layers (llama.cpp scales them by 1)")
    return out


@dataclass(frozen=True)
class ArchSpec:
    """One HF architecture as llama.cpp's converter writes it."""

    arch: MODEL_ARCH
    permute_qk: bool = False                # Llama's rotary row interleave (llama.cpp runs it with NORM rope)
    norm_shift: float = 0.0                 # added to every `*norm.weight` (Gemma: x * (1 + w) stored as 1 + w)
    hparams: Callable[[GGUFWriter, Config], None] = _llama_keys
    checks: Callable[[Config], list[str]] = _llama_checks
    skip: tuple[str, ...] = field(default=("rotary_emb.inv_freq",))  # HF tensors the file does not hold
    normalized_config: bool = False         # read the config through transformers (its defaults), as the converter


GGUF_ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(MODEL_ARCH.QWEN2),
    "Gemma3ForCausalLM": ArchSpec(MODEL_ARCH.GEMMA3, norm_shift=1.0, hparams=_gemma3_keys, checks=_gemma3_checks,
                                  normalized_config=True),
}
