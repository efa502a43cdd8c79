"""GPTQ towards the float model's outputs (`--opt float_target=true`, GPTAQ): the least-squares target, its
identity when the two streams agree, and the option end to end (codes move, KL on the calibration windows
falls, reruns are byte-identical, refusals are one line)."""

from __future__ import annotations

import pytest
import torch

from quantkit.api import quantize
from quantkit.errors import QuantkitError
from quantkit.methods.gptq.float_target import FloatTargetStats, float_target
from tests.tiny import llama_config, make_model
from tests.unit.test_e2e_stage import _calibration_ids, _kl_to_base


def _stats(x: torch.Tensor, xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    return 2 * xq.t() @ xq / n, 2 * xq.t() @ x / n


def test_target_is_w_when_the_streams_agree_and_the_least_squares_fit_when_not():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 16, generator=g), torch.randn(400, 16, generator=g)
    h, c = _stats(x, x)
    torch.testing.assert_close(float_target(w, h, c, 0.01), w, rtol=1e-4, atol=1e-5)
    xq = x + 0.3 * torch.randn(400, 16, generator=g)  # the quantized model's inputs: the float ones, moved
    h, c = _stats(x, xq)
    target = float_target(w, h, c, 0.0)
    lstsq = torch.linalg.lstsq(xq.double(), (x @ w.t()).double()).solution.t().float()  # min ||X Wᵀ - X̃ W*ᵀ||
    torch.testing.assert_close(target, lstsq, rtol=1e-3, atol=1e-4)
    assert float((x @ w.t() - xq @ target.t()).pow(2).sum()) < float((x @ w.t() - xq @ w.t()).pow(2).sum())
    ridge = float_target(w, h, c, 10.0)  # a large dampening pulls the target back towards W
    assert float((ridge - w).norm()) < float((target - w).norm())


def test_float_target_stats_pair_each_batch_with_its_float_inputs():
    from types import SimpleNamespace

    from quantkit.methods.gptq.algorithm import HessianAccumulator

    g = torch.Generator().manual_seed(1)
    floats = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    quant = [f + 0.1 * torch.randn(f.shape, generator=g) for f in floats]
    calib = SimpleNamespace(batch=0)
    acc = FloatTargetStats(calib, floats, HessianAccumulator(8, "cpu"))
    for k in (2, 0, 1):  # any order: each batch is paired by its index
        calib.batch = k
        acc.add(quant[k])
    x, xq = torch.cat(floats).reshape(-1, 8), torch.cat(quant).reshape(-1, 8)
    stats = acc.hessian()
    torch.testing.assert_close(stats.cross, 2 * xq.t() @ x / x.shape[0])
    torch.testing.assert_close(stats.h, 2 * xq.t() @ xq / x.shape[0], rtol=1e-5, atol=1e-5)
    calib.batch = 0
    with pytest.raises(ValueError, match="float tokens"):
        FloatTargetStats(calib, floats, HessianAccumulator(8, "cpu")).add(quant[0][:1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ft") / "m", llama_config(layers=3, hidden=64, inter=128))


def _calib(text_file):
    return {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2}


def test_float_target_moves_the_codes_lowers_kl_and_reruns_byte_identical(tiny, text_file, tmp_path):
    kw = dict(scheme={"bits": 3, "group_size": 32}, calib=_calib(text_file), device="cpu")
    for name, opts in (("a", {"float_target": True}), ("b", {"float_target": True}), ("plain", {})):
        quantize(tiny, "gptq", tmp_path / name, options={"calib_dtype": "float32", **opts}, **kw)
    a, b, plain = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b", "plain"))
    assert a == b and a != plain
    ids = _calibration_ids(tiny, text_file)
    assert _kl_to_base(tiny, tmp_path / "a", ids) < _kl_to_base(tiny, tmp_path / "plain", ids)


def test_float_target_refusals(tiny, text_file, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(QuantkitError, match="float_target"):
        quantize(tiny, "gptq", out, fmt="gguf", gguf_type="q4_0", calib=_calib(text_file), device="cpu",
                 options={"float_target": True})
    assert not out.exists()


def test_float_target_refuses_moe(tmp_path):
    from tests.tiny import write_text
    from tests.unit.moe_models import make_moe

    model = make_moe(tmp_path / "moe", "MixtralForCausalLM")
    text = write_text(tmp_path / "c.txt")
    with pytest.raises(QuantkitError, match="MoE"):
        quantize(model, "gptq", tmp_path / "o", scheme={"bits": 4, "group_size": 32}, device="cpu",
                 calib={"dataset": str(text), "nsamples": 4, "seqlen": 32}, options={"float_target": True})
    assert not (tmp_path / "o").exists()
