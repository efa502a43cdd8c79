"""GPTQ for llama.cpp's 8-bit activations (quantkit.methods.gptq.activations, `--opt activations=q8`): the
activation quantizers against values worked out from ggml's formulas, the statistics, the least-squares target,
and the CLI option (changes the codes; refused off GGUF)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.convert.ggml_grid import BlockCodec, encode_on_grid
from quantkit.convert.gguf_quant import dequantize_rows
from quantkit.methods.gptq.activations import (QuantizedInputStats, least_squares_target, q8_0_activations,
                                               q8_k_activations, quantize_activations, vec_dot_type)
from quantkit.methods.gptq.algorithm import GPTQParams, HessianAccumulator
from quantkit.methods.gptq.grid import grid_group

Q = GGMLQuantizationType
runner = CliRunner()
F16_1_127 = 0.00787353515625  # f16(1/127): 2**-7 * 1032/1024


def test_q8_0_known_values():
    x = torch.zeros(3, 32)
    x[0, :6] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.4])        # amax 127: d = 1, ties to even
    x[1, :4] = torch.tensor([1.0, 0.5, -0.25, 0.003])                   # amax 1: d = f16(1/127)
    got = q8_0_activations(x)
    assert got[0, :6].tolist() == [127.0, 2.0, 4.0, -2.0, -0.0, 0.0]
    # 0.5 * 127 = 63.5 -> 64 (even), -0.25 * 127 = -31.75 -> -32, 0.003 * 127 = 0.381 -> 0; times f16(1/127)
    assert got[1, :4].tolist() == [127 * F16_1_127, 64 * F16_1_127, -32 * F16_1_127, 0.0]
    assert torch.equal(got[2], torch.zeros(32))                          # an all-zero block
    ref = q8_0_activations(x, ref=True)                                  # roundf: ties away from zero
    assert ref[0, :5].tolist() == [127.0, 3.0, 4.0, -3.0, -1.0]


def test_q8_0_reference_is_gguf_pys():
    from gguf.quants import dequantize, quantize

    x = (torch.randn(16, 128) * torch.logspace(-2, 1, 128)).float()
    x[4, :32] = 0.0
    want = dequantize(quantize(x.numpy(), Q.Q8_0), Q.Q8_0)
    assert np.array_equal(q8_0_activations(x, ref=True).numpy(), want)
    assert np.abs(q8_0_activations(x).numpy() - want).max() <= np.abs(want).max() / 127  # one step at most


def test_q8_k_known_values():
    x = torch.zeros(3, 256)
    x[0, [3, 7, 9, 11]] = torch.tensor([-127.0, 127.0, 2.5, 3.5])       # first largest |x| is -127: iscale = 1
    x[1, [3, 7]] = torch.tensor([2.0, -2.0])                             # first is +2: iscale = -63.5
    x[1, 8] = 0.25                                                        # -15.875 -> -16
    got = q8_k_activations(x)
    assert got[0, [3, 7, 9, 11]].tolist() == [-127.0, 127.0, 2.0, 4.0]   # d = 1/iscale = 1; ties to even
    d = np.float32(1) / np.float32(-63.5)                                  # float32, not f16
    want = (np.array([-127, 127, -16], np.float32) * d).tolist()
    assert got[1, [3, 7, 8]].tolist() == want
    assert torch.equal(got[2], torch.zeros(256))
    with pytest.raises(RuntimeError):
        q8_k_activations(torch.ones(2, 96))                               # 256-value blocks only


def test_vec_dot_types():
    assert [vec_dot_type(t) for t in ("Q8_0", "Q5_0", "Q4_0", "IQ4_NL", "Q5_1", "Q4_1", "Q6_K", "Q4_K", "IQ4_XS",
                                      "F16")] == ["Q8_0"] * 4 + ["Q8_1"] * 2 + ["Q8_K"] * 3 + [None]
    x = torch.randn(4, 256)
    assert torch.equal(quantize_activations(x, "Q8_1"), q8_0_activations(x))
    assert torch.equal(quantize_activations(x, "Q8_K"), q8_k_activations(x))


def _inputs(seed: int = 0, n_in: int = 256, outlier: bool = True):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    x = (torch.randn(512, n_in, generator=g) @ mix) * torch.linspace(0.2, 3, n_in)
    if outlier:
        x[:, 5] *= 40                          # an outlier channel: its block's other inputs get coarse codes
    return x


def test_statistics_of_the_quantized_inputs():
    x = _inputs()
    st = QuantizedInputStats(256, ["Q8_0", "Q8_K"], "cpu")
    for part in x.split(128):
        st.add(part.reshape(2, 64, 256))
    st.hessian()
    for kind in ("Q8_0", "Q8_K"):
        xq = quantize_activations(x, kind).double()
        assert torch.allclose(st.done[kind].double(), 2 * xq.T @ xq / 512, rtol=1e-5, atol=1e-5)
        assert torch.allclose(st.cross[kind].double(), 2 * x.double().T @ xq / 512, rtol=1e-5, atol=1e-5)


class _Calib:
    device = torch.device("cpu")

    @staticmethod
    def master(mod):
        return mod.weight.detach()


class _Group:
    def __init__(self, lin):
        self.names, self.modules = ("proj",), (lin,)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K])
def test_rounding_for_quantized_activations_lowers_their_error(qtype):
    """‖XWᵀ - X_qŴᵀ‖², the output error llama.cpp shows: lower with activations=q8 than with the float Hessian, and
    lower still than the Hessian of X_q alone (q8_hessian); every file's codes on the type's own grid."""
    x = _inputs()
    lin = torch.nn.Linear(256, 48, bias=False)
    w = lin.weight.detach().clone()
    codec = BlockCodec(qtype)
    kind = vec_dot_type(codec.name)
    xq = quantize_activations(x, kind).double()
    params = GPTQParams(bits=8, group_size=-1, damp=0.01, group_aware=True)

    def run(acc, alpha: float = 1.0) -> tuple[float, np.ndarray]:
        acc.add(x)
        lin.weight.data.copy_(w)
        data = grid_group({"m.0.proj": codec}, "m.0.", params, alpha)(_Calib, _Group(lin), acc.hessian())["proj"]
        dec = dequantize_rows(data, qtype, 256)
        assert np.array_equal(encode_on_grid(dec, data, qtype), data)
        assert torch.equal(lin.weight.detach(), torch.from_numpy(dec))  # the grid values written back
        return float((x.double() @ w.double().T - xq @ torch.from_numpy(dec).double().T).square().sum()), data

    flt, a = run(HessianAccumulator(256, "cpu"))
    hess, b = run(QuantizedInputStats(256, [kind], "cpu", cross=False))
    act, c = run(QuantizedInputStats(256, [kind], "cpu"))
    assert not np.array_equal(a, c) and not np.array_equal(b, c)
    assert act < 0.9 * flt and act < hess
    # q8_target: the same target rounded with the float Hessian; alpha 0 leaves the target at W
    tgt, d = run(QuantizedInputStats(256, [kind], "cpu", float_hessian=True))
    assert tgt < flt and not np.array_equal(d, c)
    assert np.array_equal(run(QuantizedInputStats(256, [kind], "cpu", float_hessian=True), 0.0)[1], a)
    assert np.array_equal(run(QuantizedInputStats(256, [kind], "cpu"), 0.0)[1], b)
    half, e = run(QuantizedInputStats(256, [kind], "cpu"), 0.5)
    assert act < half < hess
    # the target alone: the least-squares weight beats W itself on the quantized activations
    st = QuantizedInputStats(256, [kind], "cpu")
    st.add(x)
    st.hessian()
    v = least_squares_target(w, st.cross[kind], st.done[kind], 0.0).double()
    base = (x.double() @ w.double().T - xq @ w.double().T).square().sum()
    assert float((x.double() @ w.double().T - xq @ v.T).square().sum()) < 0.9 * float(base)


def _quantize(model, out, text_file, *extra):
    return runner.invoke(app, ["quantize", str(model), "--method", "gptq", "--out", str(out), "--dataset",
                               str(text_file), "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--quiet",
                               *extra])


@pytest.mark.parametrize("mode", ["q8", "q8_hessian", "q8_target"])
def test_cli_activations_change_the_decoder_codes(tiny_llama, text_file, tmp_path, mode):
    plain, act = tmp_path / "plain.gguf", tmp_path / "act.gguf"
    assert _quantize(tiny_llama, plain, text_file, "--format", "gguf", "--type", "q8_0").exit_code == 0
    r = _quantize(tiny_llama, act, text_file, "--format", "gguf", "--type", "q8_0", "--opt", f"activations={mode}")
    assert r.exit_code == 0, r.output
    a = {t.name: t for t in GGUFReader(str(plain)).tensors}
    b = {t.name: t for t in GGUFReader(str(act)).tensors}
    assert plain.stat().st_size == act.stat().st_size
    moved = 0
    for name, t in b.items():
        if not name.startswith("blk.") or t.tensor_type in (Q.F32, Q.F16):
            continue
        data = np.asarray(t.data)
        dec = dequantize_rows(data, t.tensor_type, int(t.shape[0]))
        assert np.array_equal(encode_on_grid(dec, data, t.tensor_type), data), name
        moved += not np.array_equal(data, np.asarray(a[name].data))
    assert moved >= 10


def test_cli_activations_refused_off_gguf(tiny_llama, text_file, tmp_path):
    out = tmp_path / "o"
    r = _quantize(tiny_llama, out, text_file, "--opt", "activations=q8")
    assert r.exit_code == 2, r.output
    assert "activations goes with --format gguf" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not out.exists()
