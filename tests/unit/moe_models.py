"""Tiny random MoE models (hidden 64, top-2) for the MoE tests, and a helper that quantizes one
keeping the in-memory artifact (whose model computes with the dequantized weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny import make_model

_COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, num_experts_per_tok=2)


def moe_config(arch: str):
    import transformers as tf

    if arch == "MixtralForCausalLM":
        cfg = tf.MixtralConfig(**_COMMON, intermediate_size=64, num_local_experts=4)
    elif arch == "Qwen3MoeForCausalLM":
        cfg = tf.Qwen3MoeConfig(**_COMMON, moe_intermediate_size=32, intermediate_size=128, num_experts=8, head_dim=16)
    elif arch == "Qwen2MoeForCausalLM":  # a shared expert, and block 1 dense (mlp_only_layers)
        cfg = tf.Qwen2MoeConfig(**_COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                intermediate_size=128, num_experts=4, mlp_only_layers=[1])
    else:
        raise AssertionError(arch)
    cfg.architectures = [arch]
    return cfg


def starve_expert(folder: Path, layer: int = 0, expert: int = 2) -> Path:
    """Edit the saved model so that block `layer`'s router never picks `expert`.

    Every embedding gets 1 on channel 0 and 10x its random other channels (std 0.2), so after
    RMSNorm channel 0 is ~+4 for every token while the rest still varies with the token (and
    dominates what attention adds in common). The router's column 0 is then -1 for `expert` (its
    logit ~-4, never in the top 2) and 0 for the others, so their routing still varies with the
    token; the other blocks' routers ignore channel 0 as well.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 1:] *= 10.0
        model.model.embed_tokens.weight[:, 0] = 1.0
        for i, block in enumerate(model.model.layers):
            block.mlp.gate.weight[:, 0] = 0.0
            if i == layer:
                block.mlp.gate.weight[expert, 0] = -1.0
    for f in folder.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(folder)
    return folder


def make_moe(folder: Path, arch: str, starve: bool = False) -> Path:
    make_model(folder, moe_config(arch))
    return starve_expert(folder) if starve else folder


def quantize_keep(folder: Path, method: str, out: Path, text: Path, bits: int = 4, **options):
    """(artifact, checkpoint folder): the method's artifact saved (float32 tensors) as quantize() would."""
    from quantkit.methods.base import CalibSpec, QuantJob
    from quantkit.models.sources import resolve
    from quantkit.paths import atomic_dir
    from quantkit.registry import get_method
    from quantkit.scheme import make_scheme

    impl = get_method(method)
    if "calib_dtype" in impl.Options.model_fields:
        # the artifact's in-memory model holds the dequantized weights only when blocks compute in float32
        # (a 16-bit block gets its float32 tensors back afterwards); the tests compare it with the checkpoint
        options.setdefault("calib_dtype", "float32")
    job = QuantJob(source=resolve(folder), scheme=make_scheme(None, bits=bits, group_size=32),
                   options=impl.Options(**options),
                   calib=CalibSpec(dataset=str(text), nsamples=4, seqlen=32, batch_size=2),
                   save_dtype=torch.float32)
    torch.manual_seed(0)
    artifact = impl.quantize(job)
    with atomic_dir(out) as tmp:
        artifact.save(tmp)
    return artifact, out


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
