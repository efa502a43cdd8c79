"""Kernel selection (CPU and, with the device mocked, CUDA), forced kernels, and the loader integration."""

from __future__ import annotations

import pytest
import torch

import quantkit
from quantkit.api import quantize
from quantkit.errors import UnknownNameError
from quantkit.formats.qlinear import QuantLinear
from quantkit.kernels import KERNELS, KernelError, LayerSpec, apply_kernels, kernel_names, kernels_used, select_kernel
from quantkit.kernels.cuda import GPTQModelKernel, pack_tinygemm_nibbles, tinygemm_inner_k_tiles


def spec(bits=4, group=64, sym=False, g_idx="trivial", device="cpu", dtype=torch.float32, out_f=576, in_f=576):
    return LayerSpec(out_f, in_f, bits, group, sym, g_idx, device, dtype)


def name_of(cls) -> str:
    return "reference" if cls is None else cls.kernel_name


# ---- CPU -------------------------------------------------------------------------------
@pytest.mark.parametrize("s,want", [
    (spec(), "cpu-int4"),
    (spec(bits=3), "cpu-int4"),
    (spec(bits=2, sym=True), "cpu-int4"),
    (spec(g_idx="permutable"), "cpu-int4"),
    (spec(g_idx="irregular"), "reference"),
    (spec(bits=8, group=-1), "cpu-int8"),
    (spec(bits=8, group=64), "cpu-int8-grouped"),
    (spec(bits=8, group=64, g_idx="permutable"), "cpu-int8-grouped"),
    (spec(out_f=200), "reference"),                 # the int4 packer needs out_features % 16 == 0
    (spec(dtype=torch.bfloat16), "cpu-int4"),
])
def test_auto_on_cpu(s, want):
    assert name_of(select_kernel(s, "auto")) == want


def test_dyn_quant_is_auto_only_with_kleidiai(monkeypatch):
    s = spec(sym=True)
    monkeypatch.setattr(KERNELS["cpu-int4"], "unavailable", classmethod(lambda cls: "no int4 op"))
    kleidi = torch.backends.kleidiai
    monkeypatch.setattr(kleidi, "is_available", lambda: False)
    assert select_kernel(s, "auto") is None
    monkeypatch.setattr(kleidi, "is_available", lambda: True)
    assert name_of(select_kernel(s, "auto")) == "cpu-dyn4"


def test_reference_and_unknown_names():
    assert select_kernel(spec(), "reference") is None
    with pytest.raises(UnknownNameError, match="choose one of: auto, reference, cpu-int4"):
        select_kernel(spec(), "int4-fast")
    assert kernel_names()[:2] == ["auto", "reference"]


@pytest.mark.parametrize("kernel,s,why", [
    ("cpu-int8", spec(bits=4), "serves 8-bit weights, the layer has 4 bits"),
    ("cpu-int8", spec(bits=8, group=64), "serves one group per output channel"),
    ("cpu-int4", spec(bits=8, group=-1), "serves 2-, 3- and 4-bit weights"),
    ("cpu-int8-grouped", spec(bits=8, group=-1), "per-channel ones go to cpu-int8"),
    ("cpu-int4", spec(g_idx="irregular"), "act-order g_idx whose groups are not runs"),
    ("cpu-dyn4", spec(sym=False), "serves symmetric 4-bit weights"),
    ("cuda-tinygemm", spec(), "runs on cuda only, the model is on cpu"),
])
def test_forced_kernel_that_cannot_serve_fails_in_one_line(kernel, s, why):
    with pytest.raises(KernelError) as e:
        select_kernel(s, kernel, layer="model.layers.0.mlp.down_proj")
    msg = str(e.value)
    assert "\n" not in msg and why in msg and "model.layers.0.mlp.down_proj" in msg and kernel in msg


# ---- CUDA, device mocked -----------------------------------------------------------------
class _FakeGPTQModelLinear:
    """Stands in for a GPTQModel QuantLinear class: only its `validate` is consulted by selection."""

    bits: tuple[int, ...] = (4,)
    sym: tuple[bool, ...] = (True, False)

    @classmethod
    def validate(cls, bits, group_size, desc_act, sym, in_features, out_features, pack_dtype, dtype, device):
        if device.type != "cuda":
            return False, ValueError(f"{cls.__name__} only supports cuda")
        if bits not in cls.bits:
            return False, ValueError(f"{cls.__name__} only supports `{list(cls.bits)}` bits: actual bits = `{bits}`")
        if sym not in cls.sym:
            return False, ValueError(f"{cls.__name__} only supports `{list(cls.sym)}` sym")
        return True, None


class _FakeMarlin(_FakeGPTQModelLinear):
    sym = (True,)


class _FakeTorch(_FakeGPTQModelLinear):
    bits = (2, 3, 4, 8)


@pytest.fixture
def gptqmodel_installed(monkeypatch):
    fakes = {"gptqmodel-marlin": _FakeMarlin, "gptqmodel-exllamav2": _FakeGPTQModelLinear, "gptqmodel-torch": _FakeTorch}
    for name, fake in fakes.items():
        monkeypatch.setattr(KERNELS[name], "gptq_class", classmethod(lambda cls, f=fake: f))
    monkeypatch.setattr(GPTQModelKernel, "unavailable", classmethod(lambda cls: None))


@pytest.fixture
def gptqmodel_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gptqmodel" else real(n, *a))


@pytest.mark.parametrize("s,want", [
    (spec(device="cuda", sym=True), "gptqmodel-marlin"),
    (spec(device="cuda", sym=False), "gptqmodel-exllamav2"),    # Marlin is sym-only
    (spec(device="cuda", bits=3), "gptqmodel-torch"),
    (spec(device="cuda", bits=8, group=-1), "gptqmodel-torch"),
    (spec(device="cpu"), "cpu-int4"),                           # GPTQModel's torch kernel is never auto on CPU
])
def test_auto_on_cuda_with_gptqmodel(gptqmodel_installed, s, want):
    assert name_of(select_kernel(s, "auto")) == want


@pytest.mark.parametrize("s,want", [
    (spec(device="cuda"), "cuda-tinygemm"),
    (spec(device="cuda", bits=3, g_idx="permutable"), "cuda-tinygemm"),
    (spec(device="cuda", bits=8, group=-1), "reference"),
    (spec(device="cuda", out_f=100), "reference"),    # tinygemm needs out_features % 8 == 0
])
def test_auto_on_cuda_without_gptqmodel(gptqmodel_missing, s, want):
    assert name_of(select_kernel(s, "auto")) == want


def test_forced_gptqmodel_kernel_quotes_its_reason(gptqmodel_installed, gptqmodel_missing):
    with pytest.raises(KernelError, match="gptqmodel refuses: _FakeMarlin only supports"):
        select_kernel(spec(device="cuda", sym=False), "gptqmodel-marlin", layer="q_proj")


def test_forced_gptqmodel_kernel_when_not_installed(gptqmodel_missing):
    with pytest.raises(KernelError, match="gptqmodel is not installed"):
        select_kernel(spec(device="cuda"), "gptqmodel-exllamav2", layer="q_proj")


def test_tinygemm_packing_helpers():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]])
    assert pack_tinygemm_nibbles(codes).tolist() == [[0x12, 0x34], [0xF0, 0x78]]
    assert [tinygemm_inner_k_tiles(k) for k in (576, 4096, 96)] == [4, 8, 2]


# ---- loader integration --------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    out = {}
    for name, scheme in {"w4": {"bits": 4, "group_size": 32}, "w8": "w8", "w8g32": {"bits": 8, "group_size": 32},
                         "w4act": {"bits": 4, "group_size": 32, "desc_act": True}}.items():
        try:
            quantize(tiny_llama, "rtn", root / name, scheme=scheme, device="cpu")
        except Exception as e:  # RTN may refuse act-order; the test using it then skips
            out[name] = e
            continue
        out[name] = root / name
    return out


def _logits(model, seed=0):
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("ck,want", [("w4", {"cpu-int4": 14}), ("w8", {"cpu-int8": 14}), ("w8g32", {"cpu-int8-grouped": 14})])
def test_load_auto_serves_each_layer_and_matches_reference(checkpoints, ck, want):
    ref = quantkit.load(checkpoints[ck])
    assert kernels_used(ref) == {"reference": 14}
    fast = quantkit.load(checkpoints[ck], kernel="auto")
    assert kernels_used(fast) == want
    assert sum(isinstance(m, QuantLinear) for m in fast.modules()) == 14
    a, b = _logits(ref), _logits(fast)
    assert float((a - b).norm() / a.norm()) < 2e-2


def test_load_bf16_auto(checkpoints):
    fast = quantkit.load(checkpoints["w4"], dtype=torch.bfloat16, kernel="auto")
    assert kernels_used(fast) == {"cpu-int4": 14}
    assert _logits(fast).isfinite().all()


def test_load_forced_kernel_that_cannot_serve(checkpoints):
    with pytest.raises(KernelError, match=r"kernel 'cpu-int8' cannot serve model\.layers\.0\.\w+\.\w+_proj: serves 8-bit"):
        quantkit.load(checkpoints["w4"], kernel="cpu-int8")
    with pytest.raises(UnknownNameError):
        quantkit.load(checkpoints["w4"], kernel="fastest")


def test_apply_kernels_is_idempotent_and_reference_is_a_no_op(checkpoints):
    model = quantkit.load(checkpoints["w4"])
    assert apply_kernels(model, "reference") == {"reference": 14}
    assert apply_kernels(model, "auto") == {"cpu-int4": 14}
    assert apply_kernels(model, "auto") == {"cpu-int4": 14}


@pytest.mark.parametrize("bits,group,layout", [(4, 32, "gptq"), (2, 64, "gptq"), (8, -1, "gptq"), (3, 32, "gptq"),
                                               (4, 64, "awq"), (4, -1, "gptq2")])
def test_fast_unpack_equals_the_layouts_unpack(bits, group, layout):
    from quantkit.formats.awq import AWQLayout
    from quantkit.formats.layouts import GPTQLayout
    from quantkit.grid import rtn_quantize
    from quantkit.kernels.unpack import fast_quantized

    lay = {"gptq": GPTQLayout(), "gptq2": GPTQLayout(version=2), "awq": AWQLayout()}[layout]
    g = torch.Generator().manual_seed(bits)
    qw = rtn_quantize(torch.randn(96, 128, generator=g), bits, group, False, bias=torch.randn(96, generator=g))
    assert fast_quantized(QuantLinear.from_quantized(qw, lay)).codes.dtype == torch.uint8
    mod = QuantLinear.from_quantized(qw, lay)
    want, got = mod.quantized(), fast_quantized(mod)
    for field in ("codes", "scales", "zeros", "g_idx", "bias"):
        a, b = getattr(want, field), getattr(got, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert (got.bits, got.group_size, got.sym) == (want.bits, want.group_size, want.sym)


@pytest.mark.parametrize("n,k", [(64, 128), (96, 576), (48, 64), (1536, 576), (32, 64), (192, 2048)])
def test_cpu_int4pack_equals_the_op(n, k):
    """The uint8 packer builds exactly the op's layout on this CPU (32-row blocks on AVX2, 64 on AVX512),
    and defers to the op for other row counts."""
    from quantkit.kernels.int4 import cpu_int4pack

    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip("torch without the CPU int4pack op")
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    got = cpu_int4pack(codes)
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("n,k,group,act", [(128, 256, 64, False), (192, 576, 32, False), (128, 256, -1, False),
                                           (96, 128, 64, False), (128, 256, 64, True)])
def test_cpu_int4_direct_from_gptq_words_equals_packing_the_codes(n, k, group, act):
    """CpuInt4.from_module packs GPTQ 4-bit words straight into the op's layout where it can (N a whole
    number of the op's blocks, contiguous groups); the module equals one packed from unpacked codes."""
    from quantkit.formats.layouts import GPTQLayout
    from quantkit.grid import rtn_quantize
    from quantkit.kernels.cpu import CpuInt4
    from quantkit.kernels.int4 import cpu_int4pack, gptq4_int4pack, int4pack_block_rows
    from quantkit.kernels.unpack import fast_quantized

    if CpuInt4.unavailable():
        pytest.skip(CpuInt4.unavailable())
    g = torch.Generator().manual_seed(n + k)
    qw = rtn_quantize(torch.randn(n, k, generator=g), 4, group, False)
    if act:  # an act-order g_idx: columns of a group scattered (the direct path must not take it)
        qw.g_idx = qw.g_idx[torch.randperm(k, generator=g)].contiguous()
    mod = QuantLinear.from_quantized(qw, GPTQLayout())
    rows = int4pack_block_rows()
    if rows and n % rows == 0:
        assert torch.equal(gptq4_int4pack(mod.qweight, rows), cpu_int4pack(fast_quantized(mod).codes))
    direct = CpuInt4.from_module(mod, fast_quantized(mod, codes=False), "cpu", torch.float32)
    full = CpuInt4(fast_quantized(mod), GPTQLayout(), "cpu", torch.float32)
    a, b = direct.buffers_dict(), full.buffers_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] is None) == (b[key] is None) and (a[key] is None or torch.equal(a[key], b[key])), key
    x = torch.randn(3, k, generator=g)
    assert torch.equal(direct(x), full(x))


@pytest.mark.parametrize("n,k,sym", [(128, 256, False), (96, 64, True), (32, 32, False)])
def test_cpu_int8_direct_from_gptq_words_equals_packing_the_codes(n, k, sym):
    """CpuInt8.from_module turns GPTQ 8-bit words into the int8 weight directly; the module equals one
    packed from unpacked codes, and the checkpoint's words are left untouched."""
    from quantkit.formats.layouts import GPTQLayout
    from quantkit.grid import rtn_quantize
    from quantkit.kernels.cpu import CpuInt8
    from quantkit.kernels.unpack import fast_quantized

    if CpuInt8.unavailable():
        pytest.skip(CpuInt8.unavailable())
    g = torch.Generator().manual_seed(n + k)
    qw = rtn_quantize(torch.randn(n, k, generator=g), 8, -1, sym)
    mod = QuantLinear.from_quantized(qw, GPTQLayout())
    words = mod.qweight.clone()
    direct = CpuInt8.from_module(mod, fast_quantized(mod, codes=False), "cpu", torch.float32)
    full = CpuInt8(fast_quantized(mod), GPTQLayout(), "cpu", torch.float32)
    assert torch.equal(mod.qweight, words)
    a, b = direct.buffers_dict(), full.buffers_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] is None) == (b[key] is None) and (a[key] is None or torch.equal(a[key], b[key])), key
    assert a["qweight"].dtype == torch.int8 and a["qweight"].shape == (n, k)
    x = torch.randn(3, k, generator=g)
    assert torch.equal(direct(x), full(x))


def test_dense_kernel_is_bit_identical_to_the_reference(tiny_llama, text_file, tmp_path):
    """kernel="dense" dequantizes once at load; its logits equal the reference module's bit for bit."""
    for name, scheme in (("g32", {"bits": 4, "group_size": 32}), ("act", {"bits": 3, "group_size": 32, "desc_act": True})):
        out = tmp_path / name
        quantize(tiny_llama, "gptq" if name == "act" else "rtn", out, scheme=scheme, device="cpu",
                 calib={"dataset": str(text_file), "nsamples": 2, "seqlen": 32} if name == "act" else None)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        ref, dense = quantkit.load(out), quantkit.load(out, kernel="dense")
        assert set(kernels_used(dense)) == {"dense"}
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, dense(ids).logits)
    assert select_kernel(spec(), "auto") is not KERNELS["dense"]  # never chosen automatically
