"""The architecture table against tiny random models of every supported family.

For each architecture: the table's Linears exist, each true-sequential group's Linears
read one and the same input (GPTQ shares one Hessian between them), groups run in the
table's order, and GPTQ end to end (quantize -> save -> quantkit.load) gives the logits
of the float model carrying the dequantized weights.
"""

from __future__ import annotations

import pytest
import torch

import quantkit
from quantkit.api import quantize
from quantkit.calib.hooks import HookSet
from quantkit.errors import UnknownNameError
from quantkit.models.arch import ARCHITECTURES, block_linears, get_arch, get_blocks
from quantkit.models.sources import load_model, resolve
from tests.tiny import make_model, write_text

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=True)


def _config(arch: str):
    import transformers as tf

    if arch == "LlamaForCausalLM":
        cfg = tf.LlamaConfig(**_COMMON)
    elif arch == "MistralForCausalLM":
        cfg = tf.MistralConfig(**_COMMON, head_dim=16)
    elif arch == "Qwen2ForCausalLM":
        cfg = tf.Qwen2Config(**_COMMON)
    elif arch == "Qwen3ForCausalLM":
        cfg = tf.Qwen3Config(**_COMMON, head_dim=16)
    elif arch == "Gemma2ForCausalLM":
        cfg = tf.Gemma2Config(**_COMMON, head_dim=16, sliding_window=16)
    elif arch == "Gemma3ForCausalLM":
        cfg = tf.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=16)
    elif arch == "Phi3ForCausalLM":
        cfg = tf.Phi3Config(**{**_COMMON, "num_key_value_heads": 4}, pad_token_id=0)
    elif arch == "OPTForCausalLM":
        cfg = tf.OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1)
    else:
        raise AssertionError(arch)
    cfg.architectures = [arch]
    return cfg


ARCHS = sorted(a for a, spec in ARCHITECTURES.items() if spec.moe is None)  # MoE: tests/unit/test_moe*.py


def test_table_covers_the_issue_families():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
            "Gemma3ForCausalLM", "Phi3ForCausalLM", "OPTForCausalLM"} <= set(ARCHITECTURES)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_share_inputs_and_run_in_order(arch, tmp_path):
    folder = make_model(tmp_path / "m", _config(arch))
    model, _ = load_model(resolve(folder))
    spec = get_arch(model)
    block = get_blocks(model, spec)[0]
    linears = block_linears(block, spec)
    assert set(linears) == set(spec.linears), f"{arch}: table names {set(spec.linears) - set(linears)} missing"
    seen: list[tuple[str, torch.Tensor]] = []
    with HookSet() as hs:
        for name, mod in linears.items():
            hs.inputs(mod, lambda n, x: seen.append((n, x.detach().clone())), name)
        model(input_ids=torch.randint(0, 320, (2, 24)), use_cache=False)
    first_block = seen[: len(linears)]
    order = [n for n, _ in first_block]
    assert order == [n for g in spec.sequential for n in g], f"{arch}: execution order {order}"
    by_name = dict(first_block)
    for group in spec.sequential:
        for other in group[1:]:
            assert torch.equal(by_name[group[0]], by_name[other]), f"{arch}: {other} input differs from {group[0]}"


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_end_to_end(arch, tmp_path, text):
    folder = make_model(tmp_path / "m", _config(arch))
    out = tmp_path / "q"
    quantize(folder, "gptq", out, scheme={"bits": 4, "group_size": 32, "desc_act": arch == "LlamaForCausalLM"},
             calib={"dataset": str(text), "nsamples": 4, "seqlen": 32, "batch_size": 2}, device="cpu",
             save_dtype="float32")
    q = quantkit.load(out)
    ref, _ = load_model(resolve(folder))
    spec = get_arch(ref)
    n_quant = 0
    for i, block in enumerate(get_blocks(q, spec)):
        for name in spec.linears:  # quantized modules are QuantLinear now, found by name
            qmod = block.get_submodule(name)
            target = get_blocks(ref, spec)[i].get_submodule(name)
            target.weight.data = qmod.dequantize(torch.float32)
            n_quant += 1
    assert n_quant == 2 * len(spec.linears)
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = q(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_architecture_names_it(tmp_path):
    from transformers import GPT2Config

    folder = make_model(tmp_path / "m", GPT2Config(vocab_size=320, n_embd=64, n_layer=1, n_head=4,
                                                   architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnknownNameError, match="GPT2LMHeadModel") as err:
        quantize(folder, "gptq", tmp_path / "q", scheme="w4g64", device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_shortcuts_change_nothing(arch, tmp_path, text, monkeypatch):
    """Replacing finished submodules by their last Linear on recorded inputs gives the same bytes."""
    from quantkit.calib.shortcut import Shortcut

    used = []
    standing_in = Shortcut.standing_in
    monkeypatch.setattr(Shortcut, "standing_in", lambda self: used.append(self) or standing_in(self))
    folder = make_model(tmp_path / "m", _config(arch))
    calib = {"dataset": str(text), "nsamples": 4, "seqlen": 32, "batch_size": 2}
    for name, on in (("on", True), ("off", False)):
        quantize(folder, "gptq", tmp_path / name, scheme={"bits": 4, "group_size": 32}, calib=calib,
                 options={"shortcuts": on}, device="cpu")
    assert (tmp_path / "on" / "model.safetensors").read_bytes() == (tmp_path / "off" / "model.safetensors").read_bytes()
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "OPTForCausalLM"):  # sdpa attention returns no weights
        assert used, f"{arch}: no submodule was stood in for"


def test_down_proj_shortcut_only_where_its_inputs_are_affordable():
    from quantkit.calib.shortcut import Shortcut

    down = torch.nn.Linear(1536, 576, device="meta")  # smollm2's down_proj
    assert not Shortcut.affordable(down, torch.float32)  # 1536 x 4 B > 2 x 576 x 4 B per token
    assert Shortcut.affordable(down, torch.bfloat16)
    assert Shortcut.affordable(torch.nn.Linear(576, 576, device="meta"), torch.float32)  # o_proj always


def test_gptq_shortcuts_in_bfloat16_stand_in_for_attention_and_mlp(tmp_path, text, monkeypatch):
    from quantkit.calib.shortcut import Shortcut

    used = []
    standing_in = Shortcut.standing_in
    monkeypatch.setattr(Shortcut, "standing_in", lambda self: used.append(self.linear) or standing_in(self))
    folder = make_model(tmp_path / "m", _config("LlamaForCausalLM"))
    calib = {"dataset": str(text), "nsamples": 4, "seqlen": 32, "batch_size": 2}
    for name, on in (("on", True), ("off", False)):
        quantize(folder, "gptq", tmp_path / name, scheme={"bits": 4, "group_size": 32}, calib=calib,
                 options={"shortcuts": on, "calib_dtype": "bfloat16"}, device="cpu")
    assert (tmp_path / "on" / "model.safetensors").read_bytes() == (tmp_path / "off" / "model.safetensors").read_bytes()
    shapes = {(m.in_features, m.out_features) for m in used}
    assert shapes == {(64, 64), (128, 64)}  # o_proj and down_proj
