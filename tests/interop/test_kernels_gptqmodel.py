"""quantkit's GPTQModel kernel adapter computes what the reference QuantLinear computes.

GPTQModel's Marlin and ExLlama v2 need CUDA; its pure-torch Linear runs on CPU, so
this checks, on CPU, the adapter all three share: the v2 tensors it hands over, the
build/post_init sequence and the dtype handling. Runs in .venv-interop:
    GPTQMODEL_CPU_WORKERS=2 .venv-interop/bin/python -m pytest tests/interop/test_kernels_gptqmodel.py
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from tests.interop.needs import require  # noqa: E402
require("gptqmodel")

from quantkit.formats.awq import AWQLayout
from quantkit.formats.layouts import GPTQLayout
from quantkit.formats.qlinear import QuantLinear
from quantkit.kernels import KERNELS, select_kernel, spec_of
from tests.unit.test_kernels import make_qw, rel_err

TORCH = KERNELS["gptqmodel-torch"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scheme", [(4, 64, False, False), (4, 32, True, True), (8, -1, False, False),
                                    (3, 64, False, False), (2, 32, True, False)])
@pytest.mark.parametrize("shape", [(192, 576), (64, 128)])
def test_gptqmodel_torch_kernel_matches_reference(shape, scheme, dtype):
    qw = make_qw(*shape, *scheme, seed=5)
    assert TORCH.unavailable() is None
    assert TORCH.check(spec_of(qw, "cpu", dtype)) is None
    layout = GPTQLayout() if scheme[0] != 4 or scheme[3] else AWQLayout()
    ref = QuantLinear.from_quantized(qw, layout)
    mod = TORCH(ref.quantized(), layout, "cpu", dtype)
    x = torch.randn(2, 3, shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), mod(x.to(dtype))
    assert got.dtype == dtype
    tol = {torch.float16: 3e-3, torch.bfloat16: 1e-2}[TORCH.compute_dtype(dtype)]
    assert rel_err(got, want) < tol


def test_gptqmodel_cuda_kernels_refuse_cpu_with_their_reason():
    qw = make_qw(192, 576, 4, 64, True, False, seed=0)
    spec = spec_of(qw, "cpu", torch.float16)
    for name in ("gptqmodel-marlin", "gptqmodel-exllamav2"):
        reason = KERNELS[name].check(spec)
        assert reason and "\n" not in reason
    assert select_kernel(spec, "auto").kernel_name == "cpu-int4"  # GPTQModel's torch kernel is never auto on CPU
