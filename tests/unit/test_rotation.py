"""The residual-stream rotation fused into the weights (`quantkit.models.rotation`, `--rotate`)."""

from __future__ import annotations

import pytest
import torch

from quantkit.errors import SchemeError
from quantkit.models.arch import get_arch
from quantkit.models.rotation import hadamard, paley, rotate_model, rotation_matrix
from tests.tiny import assert_quantize_refused, gemma3_config, llama_config, make_gemma3, make_model


@pytest.mark.parametrize("n", [1, 2, 12, 20, 64, 576, 640, 896, 1536])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n) and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_sizes_without_a_construction_fall_back_to_an_orthogonal_matrix():
    assert hadamard(36) is None  # 36 = 4 x 9: neither Sylvester nor Paley (35 is not prime)
    with pytest.raises(ValueError):
        paley(36)
    q = rotation_matrix(36, "hadamard")
    assert torch.allclose(q @ q.T, torch.eye(36, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_matrices_are_orthogonal_and_seeded(kind):
    q = rotation_matrix(64, kind, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation_matrix(64, kind, seed=3)) and not torch.equal(q, rotation_matrix(64, kind, seed=4))


def _random_norms(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


@pytest.mark.parametrize("tied", [True, False])
def test_rotated_model_computes_the_same_logits(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    cfg = llama_config()
    cfg.tie_word_embeddings = tied
    folder = make_model(tmp_path / "m", cfg)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    _random_norms(base)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict(base.state_dict())
    rotate_model(model, get_arch(model), "hadamard")
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = base(x).logits, model(x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)
    # the weights the quantizer sees did change: mixed by the rotation
    assert not torch.allclose(base.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_post_norm_blocks_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = make_gemma3(tmp_path / "g", gemma3_config())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with pytest.raises(SchemeError, match="no rotation rule"):
        rotate_model(model, get_arch(model))


def test_rotated_gptq_checkpoint_is_deterministic_and_reloads(tiny_llama, text_file, tmp_path):
    import quantkit
    from quantkit.api import quantize
    from transformers import AutoModelForCausalLM

    calib = {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}
    kw = dict(scheme={"bits": 4, "group_size": 32, "rotation": "hadamard"}, calib=calib, device="cpu")
    quantize(tiny_llama, "gptq", tmp_path / "a", **kw)
    quantize(tiny_llama, "gptq", tmp_path / "b", **kw)
    read = lambda f: (f / "model.safetensors").read_bytes()  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b")
    model = quantkit.load(str(tmp_path / "a"), dtype=torch.float32, kernel="reference")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert not model.config.tie_word_embeddings
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = base(x).logits, model(x).logits
    # the quantized rotated model still computes the base's function, up to the 4-bit error
    assert float((a - b).norm() / a.norm()) < 0.3
    rec = (tmp_path / "a" / "quantkit.json").read_text()
    assert '"rotation": "hadamard"' in rec


def test_cli_refuses_rotation_where_it_cannot_apply(tmp_path):
    folder = make_gemma3(tmp_path / "g", gemma3_config())
    assert_quantize_refused(folder, tmp_path / "o1", ["-m", "rtn", "--rotate", "hadamard"], "no rotation rule")
    assert_quantize_refused(folder, tmp_path / "o2", ["-m", "rtn", "--rotate", "spin"], "hadamard or random")


def test_offload_and_end_to_end_rounding_refuse_rotation(tiny_llama, text_file, tmp_path):
    from quantkit.api import quantize

    calib = {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}
    scheme = {"bits": 4, "group_size": 32, "rotation": "hadamard"}
    with pytest.raises(SchemeError, match="whole model in memory"):
        quantize(tiny_llama, "gptq", tmp_path / "a", scheme=scheme, calib=calib, device="cpu",
                 options={"offload": "disk"})
    with pytest.raises(SchemeError, match="e2e_rounding_lr"):
        quantize(tiny_llama, "signround", tmp_path / "b", scheme=scheme, calib=calib, device="cpu",
                 options={"iters": 2, "e2e_steps": 2, "e2e_rounding_lr": 0.01})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
