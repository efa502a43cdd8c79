"""The sequential pipeline as GPTQ uses it: early stops, hooks removed on error, replayed submodules."""

from __future__ import annotations

import pytest
import torch

from quantkit.calib.pipeline import BlockCalib, StopForward, capture_inputs, run_sequential
from quantkit.methods.gptq.algorithm import GPTQParams
from quantkit.methods.gptq.block import block_groups, collect_hessians, gptq_block, replay_parent
from quantkit.models.arch import get_arch, get_blocks
from quantkit.models.sources import load_model, resolve
from tests.tiny import make_model
from tests.unit.test_arch import _config


def _model(tmp_path, arch="LlamaForCausalLM"):
    model, _ = load_model(resolve(make_model(tmp_path / "m", _config(arch))))
    return model, get_arch(model)


def _samples(n=4, t=24):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(0))


def test_stop_forward_ends_each_batch_early_and_hooks_go_away(tmp_path):
    model, spec = _model(tmp_path)
    inputs = capture_inputs(model, spec, _samples(), 2, torch.device("cpu"))
    calib = BlockCalib(0, get_blocks(model, spec)[0], inputs, torch.device("cpu"))
    calls = {"q": 0, "down": 0}

    def install(hs):
        hs.pre(calib.block.self_attn.q_proj, lambda *_: calls.__setitem__("q", calls["q"] + 1))
        hs.pre(calib.block.mlp.down_proj, lambda *_: calls.__setitem__("down", calls["down"] + 1))
        hs.pre(calib.block.self_attn.o_proj, lambda *_: (_ for _ in ()).throw(StopForward))

    assert calib.forward(hooks=install, keep_outputs=True) == []  # every batch stopped: no outputs
    assert calls == {"q": 2, "down": 0}
    # a hook that fails leaves no hook behind
    with pytest.raises(RuntimeError):
        calib.forward(hooks=lambda hs: hs.pre(calib.block.mlp, lambda *_: (_ for _ in ()).throw(RuntimeError())))
    assert not calib.block.mlp._forward_pre_hooks and not calib.block.self_attn.q_proj._forward_pre_hooks
    assert len(calib.forward(keep_outputs=True)) == 2


def test_groups_and_replay_parents(tmp_path):
    model, spec = _model(tmp_path)
    block = get_blocks(model, spec)[0]
    groups = block_groups(block, spec, set(spec.linears) - {"self_attn.k_proj"})
    assert [g.names for g in groups] == [("self_attn.q_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                                         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    assert [replay_parent(a, b) for a, b in zip(groups, groups[1:])] == ["self_attn", None, "mlp"]


def test_shared_hessian_is_the_first_linear_input(tmp_path):
    model, spec = _model(tmp_path)
    inputs = capture_inputs(model, spec, _samples(), 2, torch.device("cpu"))
    calib = BlockCalib(0, get_blocks(model, spec)[0], inputs, torch.device("cpu"))
    groups = block_groups(calib.block, spec, set(spec.linears))
    seen = []
    calib.forward(hooks=lambda hs: hs.inputs(calib.block.mlp.up_proj, lambda _n, x: seen.append(x.clone()), "up"))
    x = torch.cat(seen).reshape(-1, seen[0].shape[-1])
    (h,), _ = collect_hessians(calib, [groups[2]])
    torch.testing.assert_close(h, 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "OPTForCausalLM"])
def test_replay_gives_the_same_codes_as_full_forwards(tmp_path, arch):
    results = []
    for replay in (False, True):
        model, spec = _model(tmp_path / str(replay), arch)
        targets = {f"{spec.blocks}.{i}.{n}" for i in range(2) for n in spec.linears}
        p = GPTQParams(bits=4, group_size=32)
        results.append(run_sequential(model, spec, _samples(),
                                      lambda c, spec=spec, targets=targets, p=p, r=replay: gptq_block(c, spec, targets, p, True, r),
                                      device=torch.device("cpu"), batch_size=2))
    assert results[0].keys() == results[1].keys() and len(results[0]) > 0
    for k in results[0]:
        assert torch.equal(results[0][k].codes, results[1][k].codes), k


def test_steady_heap_fixes_the_mmap_threshold_unless_the_user_did(monkeypatch):
    import quantkit.calib.heap as pl

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))

    monkeypatch.setattr(pl.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    pl.steady_heap()
    assert calls == [(-3, 4 * 2**20)]  # M_MMAP_THRESHOLD: fixed, so glibc stops raising it
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    pl.steady_heap()
    assert len(calls) == 1
