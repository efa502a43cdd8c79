"""compute.fast_bfloat16 / resolve_calib_dtype: bf16 only where the CPU has AMX tiles (AVX512-BF16 alone measured
slower than fp32), CUDA by its own flag."""

from __future__ import annotations

import pytest
import torch

from quantkit import compute


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (False, False, "float32"),
    (True, False, "float32"),  # AVX512-BF16 without AMX: bf16 matmuls 0.6x fp32's speed
    (True, True, "bfloat16"),
    (False, True, "bfloat16"),
])
def test_cpu_auto_dtype_follows_amx(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert compute.fast_bfloat16("cpu") is (expected == "bfloat16")
    assert compute.resolve_calib_dtype("auto", "cpu") == expected


def test_explicit_dtype_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert compute.resolve_calib_dtype("bfloat16", "cpu") == "bfloat16"
    assert compute.resolve_calib_dtype("float32", "cpu") == "float32"


def test_other_devices_are_not_fast():
    assert compute.fast_bfloat16("meta") is False
