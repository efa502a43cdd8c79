"""The IQ4 grid's nearest-value look-up (a table on floor(2x)) gives the same index as llama.cpp's comparison search
(best_index_int8: x - lo < hi - x in float32), so IQ4_NL / IQ4_XS files are byte-identical to what the search wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantkit.convert import iquants

F = np.float32
KV = iquants.KVALUES.astype(F)
SMOLLM2 = Path.home() / ".cache/quantkit/models/smollm2-135m/model.safetensors"


def search_index(v: np.ndarray) -> np.ndarray:
    """The comparison search the encoders ran before the look-up (llama.cpp's best_index_int8, vectorised)."""
    mu = np.clip(np.searchsorted(KV, v, side="right"), 1, 15)
    lower = (v - KV[mu - 1]) < (KV[mu] - v)
    idx = np.where(lower, mu - 1, mu)
    return np.where(v <= KV[0], 0, np.where(v >= KV[15], 15, idx)).astype(np.uint8)


def hard_values() -> np.ndarray:
    """Every grid value and midpoint, 300 float32 neighbours either side of each, and the specials."""
    mids = (KV[:-1] + KV[1:]) / F(2)
    points = np.concatenate([KV, mids, [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3e38, -3e38,
                                        -128.0, -127.5, 113.5, 128.0, 255.9, -256.1, 1e6, -1e6]]).astype(F)
    out = [points]
    for direction in (np.inf, -np.inf):
        v = points.copy()
        for _ in range(300):
            v = np.nextafter(v, F(direction))
            out.append(v)
    return np.concatenate(out)


def test_look_up_equals_the_search_on_hard_values():
    v = hard_values()
    assert v.dtype == F
    assert np.array_equal(iquants.best_index(v), search_index(v))
    assert np.array_equal(iquants._nearest_value(v), KV[search_index(v)])
    # the rule the table rests on: below a midpoint goes down, from it up (a tie goes to the upper value)
    mids = (KV[:-1] + KV[1:]) / F(2)
    assert np.array_equal(iquants.best_index(mids), np.arange(1, 16))
    assert np.array_equal(iquants.best_index(np.nextafter(mids, F(-np.inf))), np.arange(15))


def test_look_up_equals_the_search_on_random_values():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.standard_normal(200_000) * 70, rng.uniform(-130, 130, 200_000),
                        np.round(rng.uniform(-260, 260, 100_000) * 2) / 2]).astype(F).reshape(-1, 50)
    assert np.array_equal(iquants.best_index(v), search_index(v))


def test_look_up_takes_float32_only():
    with pytest.raises(TypeError):
        iquants.best_index(np.zeros(4, np.float64))


def tensors() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((24, 512)) * 0.02).astype(F)
    x[0, :40] *= 25                                                   # an outlier run
    x[1, :64] = 0                                                     # all-zero blocks
    x[2, :32] = 1e-20                                                 # below the zero-block epsilon
    out = [x]
    if SMOLLM2.is_file():
        from safetensors import safe_open

        with safe_open(str(SMOLLM2), "np") as f:
            out.append(f.get_slice("model.layers.3.mlp.down_proj.weight")[:16].astype(F))  # (16, 1536)
    return out


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_encoders_write_the_same_bytes_as_with_the_search(weighted, monkeypatch):
    rng = np.random.default_rng(4)
    for x in tensors():
        qw = (rng.random(x.shape, dtype=F) ** 4 * 10 + 0.01).astype(F) if weighted else None
        nl = x.reshape(-1, 32), None if qw is None else qw.reshape(-1, 32)
        xs = x.reshape(-1, 256), None if qw is None else qw.reshape(-1, 256)
        fast = iquants.encode_iq4_nl(*nl), iquants.encode_iq4_xs(*xs)
        with monkeypatch.context() as m:
            m.setattr(iquants, "best_index", search_index)
            m.setattr(iquants, "_nearest_value", lambda v: KV[search_index(v)])
            slow = iquants.encode_iq4_nl(*nl), iquants.encode_iq4_xs(*xs)
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype == np.uint8 and a.tobytes() == b.tobytes()
        # and the bytes decode to grid points near x (the comparison is not between two broken encoders)
        dec = iquants.decode_iq4_nl(fast[0]).reshape(x.shape)
        assert np.sqrt(((dec - x) ** 2).mean() / (x ** 2).mean()) < 0.1
