"""SignRound's fisher block loss: the block outputs' Fisher channel profile (one whole-model gradient pass, hooks
and gradient flags left as found), the weighted loss, and the method run end to end with it."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from quantkit.api import quantize
from quantkit.calib.fisher import block_output_fisher, sampled_labels
from quantkit.errors import QuantkitError
from quantkit.methods.signround.block import _mse
from tests.tiny import llama_config, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("srfisher") / "m", llama_config(hidden=64, inter=128))


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _calib(text_file):
    return {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}


def test_block_output_fisher_is_the_token_scaled_gradient_squares_and_leaves_the_model_as_found(tiny):
    model = _model(tiny)
    blocks = list(model.model.layers)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    flags = [p.requires_grad for p in model.parameters()]
    got = block_output_fisher(model, blocks, ids, seed=5)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not b._forward_hooks for b in blocks)
    # by hand: each block's output kept with retain_grad, the same sampled labels, one window at a time
    want = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in blocks]
    gen = torch.Generator().manual_seed(5)
    for i in range(ids.shape[0]):
        outs = []
        hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for b in blocks]
        x = model.get_input_embeddings()(ids[i:i + 1]).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, use_cache=False).logits
        for h in hooks:
            h.remove()
        for y in outs:
            y.retain_grad()
        labels = sampled_labels(logits, gen)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").backward()
        for k, y in enumerate(outs):
            ms = y.detach().pow(2).mean(-1, keepdim=True)
            want[k] += (y.grad.double().pow(2) * ms.double()).reshape(-1, y.shape[-1]).sum(0)
    model.zero_grad(set_to_none=True)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (model.config.hidden_size,) and g.dtype == torch.float32
        assert torch.allclose(g.double(), w / w.mean(), rtol=1e-4)
        assert abs(float(g.mean()) - 1) < 1e-5 and float(g.min()) >= 0
    again = block_output_fisher(model, blocks, ids, seed=5)
    other = block_output_fisher(model, blocks, ids, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(got, other, strict=True))


def test_hooks_are_removed_when_the_pass_fails(tiny):
    model = _model(tiny)
    blocks = list(model.model.layers)
    with pytest.raises(RuntimeError, match="boom"):
        def fail(*_a, **_k):
            raise RuntimeError("boom")
        model.lm_head.register_forward_hook(fail)
        block_output_fisher(model, blocks, torch.ones(1, 4, dtype=torch.long))
    assert all(not b._forward_hooks for b in blocks)
    assert all(p.requires_grad for p in model.parameters())


def test_fisher_loss_weights_channels_and_is_the_token_loss_when_uniform():
    torch.manual_seed(0)
    target = torch.randn(2, 6, 16)
    out = target + 0.1 * torch.randn(2, 6, 16)
    assert torch.allclose(_mse(out, target, "fisher", torch.ones(16)), _mse(out, target, "token"))
    assert torch.allclose(_mse(out, target, "fisher", None), _mse(out, target, "token"))
    w = torch.zeros(16)
    w[3] = 16.0  # mean 1, all on channel 3
    only3 = (16 * (out - target)[..., 3].pow(2) / 16 / target.pow(2).mean(-1)).mean()
    assert torch.allclose(_mse(out, target, "fisher", w), only3)
    moved = out.clone()
    moved[..., 5] += 1.0  # an error on a channel of weight 0 costs nothing
    assert torch.allclose(_mse(moved, target, "fisher", w), only3)


def test_method_with_fisher_loss_is_deterministic_records_it_and_differs_from_token(tiny, text_file, tmp_path):
    kw = dict(scheme={"bits": 3, "group_size": 32}, calib=_calib(text_file), device="cpu")
    for name in ("a", "b"):
        quantize(tiny, "signround", tmp_path / name, options={"iters": 8, "calib_dtype": "float32",
                                                              "loss": "fisher", "fisher_windows": 2}, **kw)
    quantize(tiny, "signround", tmp_path / "t", options={"iters": 8, "calib_dtype": "float32"}, **kw)
    a, b, t = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b", "t"))
    assert a == b and a != t
    opts = json.loads((tmp_path / "a" / "quantkit.json").read_text())["options"]
    assert opts["loss"] == "fisher" and opts["fisher_windows"] == 2
    assert "fisher_windows" not in json.loads((tmp_path / "t" / "quantkit.json").read_text())["options"]


def test_fisher_loss_refuses_disk_offload(tiny, text_file, tmp_path):
    with pytest.raises(QuantkitError, match="fisher loss needs the whole model"):
        quantize(tiny, "signround", tmp_path / "o", scheme={"bits": 4, "group_size": 32}, calib=_calib(text_file),
                 options={"loss": "fisher", "offload": "disk"}, device="cpu")
    assert not (tmp_path / "o").exists()
