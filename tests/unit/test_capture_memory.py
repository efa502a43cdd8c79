"""The pipeline's capture of per-layer block kwargs (Gemma 3's sliding/global attention) stops at the last block's
input: the head's logits over the whole batch (4.3 GB for 8 x 512 tokens at a 262k vocabulary) are never computed,
and each block still gets its own kwargs, so calibrating a Gemma 3 block by block matches the full model."""

import torch

from quantkit.calib.pipeline import capture_inputs, run_sequential
from quantkit.models.arch import get_arch
from tests.tiny import gemma3_config


def _gemma(layers=3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(gemma3_config(layers=layers)).eval()


def test_per_layer_capture_never_runs_the_head():
    model = _gemma()
    spec = get_arch(model)
    assert spec.per_layer_kwargs
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append("head"))
    model.model.norm.register_forward_hook(lambda *_: calls.append("norm"))
    ids = torch.randint(3, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_inputs(model, spec, ids, 2, torch.device("cpu"))
    assert calls == []
    assert inputs.per_layer is not None and len(inputs.per_layer) == 3
    assert all(kw for kw in inputs.per_layer)  # every block's kwargs, the last one's too
    # sliding (0, 2) and global (1) blocks get different masks or ropes
    def differs(a, b):
        return any(not (isinstance(a[k], torch.Tensor) and isinstance(b.get(k), torch.Tensor) and a[k].shape == b[k].shape
                        and torch.equal(a[k], b[k])) for k in a if isinstance(a[k], torch.Tensor))
    assert differs(inputs.per_layer[0], inputs.per_layer[1])


def test_block_by_block_stream_matches_the_full_model():
    """The blocks run on the captured kwargs reproduce the full model's last hidden state."""
    model = _gemma()
    spec = get_arch(model)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.model(input_ids=ids).last_hidden_state
    seen = []

    def per_block(calib):
        if calib.index == 2:
            seen.append(torch.cat(calib.forward(keep_outputs=True)))
        return {}

    run_sequential(model, spec, ids, per_block, device=torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        got = model.model.norm(seen[0])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_per_layer_capture_computes_no_block_and_records_the_real_kwargs():
    """The blocks stand aside during the capture (nothing inside them runs), yet each block's recorded kwargs equal,
    tensor for tensor, those the full model's own forward hands it."""
    model = _gemma()
    spec = get_arch(model)
    ids = torch.randint(3, 500, (4, 16), generator=torch.Generator().manual_seed(2))
    want: list[dict] = [{} for _ in model.model.layers]
    hooks = [b.register_forward_pre_hook(lambda _m, _a, kw, i=i: want.__setitem__(i, dict(kw)), with_kwargs=True)
             for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model.model(input_ids=ids[:2], use_cache=False)
    for h in hooks:
        h.remove()
    ran = []
    for b in model.model.layers:
        b.self_attn.register_forward_hook(lambda *_: ran.append("attn"))
        b.mlp.register_forward_hook(lambda *_: ran.append("mlp"))
    inputs = capture_inputs(model, spec, ids, 2, torch.device("cpu"))
    assert ran == []
    assert all("forward" not in vars(b) for b in model.model.layers)  # the stand-ins are gone

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (tuple, list)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    for got, ref in zip(inputs.per_layer, want, strict=True):
        tensors = {k: v for k, v in ref.items() if k != "hidden_states" and v is not None}
        assert tensors and all(same(got[k], v) for k, v in tensors.items())
    # and a block then run on them still reproduces the full model (the stream test above covers the rest)
    with torch.no_grad():
        assert model.model.layers[0](inputs.hidden[0], *inputs.args, **inputs.per_layer[0]).shape == inputs.hidden[0].shape
