"""The W8A8 kernels compute what the reference QuantLinear computes (activations quantized the same way), and
`auto` picks them for the layers they serve: int8 on `torch._int_mm`, FP8 dequantized on a CPU without FP8."""

import pytest
import torch

from quantkit.formats.ct_naive import CTNaiveLayout
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import quantize_weight
from quantkit.kernels import apply_kernels, kernels_used
from quantkit.scheme import make_scheme


def _layer(preset: str, out_f: int = 96, in_f: int = 128) -> QuantLinear:
    scheme = make_scheme(preset)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen) * torch.linspace(0.2, 2, in_f)
    qw = quantize_weight(w, 8, -1, True, scheme.type, scheme.weight_strategy == "tensor",
                         torch.randn(out_f, generator=gen))
    if scheme.activation_static:
        qw.input_scale = torch.tensor([0.03]).half().float()
    layout = CTNaiveLayout(scheme.type, scheme.weight_strategy == "tensor", scheme.activation_static)
    return QuantLinear.from_quantized(qw, layout, act=scheme.input_activations)


def _served(ref: QuantLinear, kernel: str) -> torch.nn.Module:
    holder = torch.nn.Sequential(ref)
    apply_kernels(holder, kernel, torch.float32)
    return holder


@pytest.mark.parametrize("preset,kernel", [("w8a8", "w8a8-int8"), ("w8a8-static", "w8a8-int8"),
                                           ("fp8-dynamic", "fp8-scaled-mm"), ("fp8", "fp8-scaled-mm")])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_kernel_matches_the_reference(preset, kernel, rows):
    ref = _layer(preset)
    x = torch.randn(rows, 128) * 2
    with torch.no_grad():
        want = ref(x)
        served = _served(_layer(preset), kernel)
        got = served(x)
    assert kernels_used(served) == {kernel: 1}
    # the same 8-bit codes on both sides: only the float rounding of the rescale differs
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), float((got - want).abs().max())


@pytest.mark.parametrize("preset,kernel", [("w8a8", "w8a8-int8"), ("w8a8-static", "w8a8-int8"),
                                           ("fp8-dynamic", "dense"), ("fp8", "dense")])
def test_auto_picks_the_w8a8_kernel_on_cpu(preset, kernel):
    served = _served(_layer(preset), "auto")
    assert kernels_used(served) == {kernel: 1}


def test_kernels_refuse_what_they_do_not_serve():
    from quantkit.kernels.base import LayerSpec
    from quantkit.kernels.w8a8 import FP8ScaledMM, W8A8Int8

    weight_only = LayerSpec(96, 128, 8, -1, True, "trivial", "cpu", torch.float32, "int", "")
    assert "int 8-bit activations" in W8A8Int8.check(weight_only)
    fp8 = LayerSpec(96, 128, 8, -1, True, "trivial", "cpu", torch.float32, "float", "float-token")
    assert W8A8Int8.check(fp8) is not None and FP8ScaledMM.check(fp8) is None
    assert FP8ScaledMM.rank(fp8) < 0  # a CPU has no FP8: never automatic there
    odd = LayerSpec(90, 128, 8, -1, True, "trivial", "cpu", torch.float32, "int", "int-token")
    assert "divisible by 16" in W8A8Int8.check(odd)
