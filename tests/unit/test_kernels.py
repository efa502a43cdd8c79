"""Every kernel computes what the reference QuantLinear computes, within its compute dtype's tolerance.

Layer shapes of smollm2-135m and of the tiny random Llama; GPTQ and AWQ layouts; sym/asym;
2/3/4/8 bits; per-group and per-channel; act-order. The same tests run every registered
kernel on every device present (CUDA kernels run where CUDA is).
"""

from __future__ import annotations

import pytest
import torch

from quantkit.formats.awq import AWQLayout
from quantkit.formats.layouts import GPTQLayout
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import QuantizedWeight, rtn_quantize
from quantkit.kernels import KERNELS, KernelError, KernelLinear, spec_of

SMOLLM2 = [(576, 576), (192, 576), (1536, 576), (576, 1536)]   # (out, in): q/o, k/v, gate/up, down
TINY = [(64, 64), (32, 64), (128, 64), (64, 128)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (bits, group_size, sym, act_order)
SCHEMES = [
    (4, 32, False, False), (4, 64, True, False), (4, -1, False, False), (4, 64, False, True),
    (4, 32, True, True), (3, 64, False, False), (2, 32, True, False), (8, -1, False, False),
    (8, -1, True, False), (8, 32, False, False), (8, 64, True, True),
]

REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
ACT_QUANT_TOL = 3e-2  # kernels that round activations to int8 per row


def make_qw(out_f: int, in_f: int, bits: int, group: int, sym: bool, act_order: bool, seed: int) -> QuantizedWeight:
    """RTN of a random weight (realistic scales/zeros); act-order shuffles which inputs form each group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    qw = rtn_quantize(w, bits, group, sym, bias=torch.randn(out_f, generator=g) * 0.1)
    if act_order:
        # GPTQ act-order: column i belongs to group rank(i) // group_size for a random column order
        order = torch.randperm(in_f, generator=g)
        qw.g_idx = (torch.argsort(order) // (in_f if group == -1 else group)).to(torch.int32)
        qw.zeros = torch.randint(1, 1 << bits, qw.zeros.shape, generator=g).to(torch.uint8) if not sym else qw.zeros
    return qw


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def tolerance(cls: type[KernelLinear], dtype: torch.dtype) -> float:
    return ACT_QUANT_TOL if cls.quantizes_activations else REL_TOL[cls.compute_dtype(dtype)]


def layouts_for(bits: int, act_order: bool) -> list:
    return [GPTQLayout()] + ([AWQLayout()] if bits == 4 and not act_order else [])


def check_layer(out_f: int, in_f: int, scheme: tuple, device: str, seed: int) -> list[str]:
    """Run every accepting kernel on one layer; returns the names of the kernels that served it."""
    bits, group, sym, act_order = scheme
    if group != -1 and in_f % group:
        return []
    qw = make_qw(out_f, in_f, bits, group, sym, act_order, seed)
    served = []
    for layout in layouts_for(bits, act_order):
        ref = QuantLinear.from_quantized(qw, layout).to(device)
        x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(seed + 1)).to(device)
        with torch.no_grad():
            want = ref(x)  # fp32 reference maths
            for dtype in (torch.float32, torch.bfloat16):
                spec = spec_of(ref.quantized(), device, dtype)
                for name, cls in KERNELS.items():
                    if cls.check(spec) is not None:
                        continue
                    mod = cls(ref.quantized(), layout, device, dtype)
                    got = mod(x.to(dtype))
                    assert got.dtype == dtype and got.shape == want.shape
                    err, tol = rel_err(got, want), tolerance(cls, dtype)
                    assert err < tol, f"{name} {layout.name} {dtype} {out_f}x{in_f} {scheme}: rel err {err:.2e} >= {tol}"
                    served.append(name)
    return served


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s[0]}g{s[1]}{'s' if s[2] else 'a'}{'-act' if s[3] else ''}")
@pytest.mark.parametrize("shape", SMOLLM2 + TINY, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernels_match_reference(shape, scheme, device):
    served = check_layer(*shape, scheme, device, seed=hash((shape, scheme)) % 1000)
    bits, group, sym, act_order = scheme
    if device == "cpu" and (group == -1 or shape[1] % group == 0):
        # on CPU every scheme has a kernel for these shapes
        assert served, f"no kernel served {shape} {scheme}"


@pytest.mark.parametrize("name", [n for n, k in KERNELS.items() if "cpu" in k.devices and k.unavailable() is None
                                  and not k.serves_activations])  # W8A8/FP8 kernels: tests/unit/test_w8a8_kernels.py
def test_every_cpu_kernel_is_exercised(name):
    """Each CPU kernel accepts some smollm2 layer of SCHEMES, so test_kernels_match_reference runs it."""
    cls = KERNELS[name]
    accepted = [s for s in SCHEMES for dtype in (torch.float32, torch.bfloat16)
                if cls.check(spec_of(make_qw(192, 576, *s, seed=3), "cpu", dtype)) is None]
    assert accepted, name


def test_kernel_output_shape_and_bias_on_3d_inputs():
    qw = make_qw(64, 128, 4, 32, False, False, seed=0)
    ref = QuantLinear.from_quantized(qw, GPTQLayout())
    mod = KERNELS["cpu-int4"](qw, GPTQLayout(), "cpu", torch.float32)
    x = torch.randn(2, 7, 128)
    assert mod(x).shape == (2, 7, 64)
    no_bias = QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.g_idx, qw.bits, qw.group_size, qw.sym)
    bare = KERNELS["cpu-int4"](no_bias, GPTQLayout(), "cpu", torch.float32)
    assert rel_err(mod(x) - bare(x), ref.bias.float().expand(2, 7, 64)) < 1e-2


def test_kernel_module_is_a_quantlinear_without_checkpoint_buffers():
    qw = make_qw(64, 128, 4, 32, True, False, seed=1)
    mod = KERNELS["cpu-int4"](qw, GPTQLayout(), "cpu", torch.float32)
    assert isinstance(mod, QuantLinear) and mod.kernel_name == "cpu-int4"
    names = set(mod.state_dict())
    assert "qzeros" not in names and "g_idx" not in names
    with pytest.raises(KernelError, match="kernel='reference'"):
        mod.quantized()
    # dequantize() is the kernel applied to the identity: bf16-close to the exact weight
    assert rel_err(mod.dequantize(), qw.dequantize()) < 1e-2


def test_int8_zero_term_is_exact_in_fp32_accumulation():
    """Asymmetric 8-bit with zeros far from 128 (all-positive weights): the rank-1 zero term keeps it accurate."""
    w = torch.rand(64, 256) * 0.1 + 0.01
    qw = rtn_quantize(w, 8, -1, False)
    assert int(qw.zeros.float().sub(128).abs().min()) > 100
    ref = QuantLinear.from_quantized(qw, GPTQLayout())
    mod = KERNELS["cpu-int8"](qw, GPTQLayout(), "cpu", torch.float32)
    x = torch.randn(4, 256)
    assert rel_err(mod(x), ref(x)) < 1e-2
