"""The bit allocator (`quantkit.budget.allocate`) and its tables (`quantkit.budget.sensitivity`): pure functions."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from quantkit.budget.allocate import Allocation, BudgetError, Option, allocate, bpw_range, hull
from quantkit.budget.sensitivity import parse_grids, size_tables, stored_bits, weighted_error
from quantkit.grid import quantize_weight
from quantkit.scheme import ModuleGrid


def _table(sizes: list[int], errors: list[float]) -> list[Option]:
    return [Option(f"g{k}", s, e) for k, (s, e) in enumerate(zip(sizes, errors, strict=True))]


def _brute(tables: dict[str, list[Option]], budget: int) -> float:
    """The least total error of any allocation within `budget` bits (exhaustive)."""
    names = sorted(tables)
    best = float("inf")
    for combo in itertools.product(*(tables[n] for n in names)):
        if sum(o.size_bits for o in combo) <= budget:
            best = min(best, sum(o.error for o in combo))
    return best


def test_hull_drops_dominated_and_concave_options():
    opts = [Option("a", 100, 10.0), Option("b", 150, 12.0),  # b: larger and worse
            Option("c", 200, 9.5),                           # c: above the segment a -> d
            Option("d", 300, 1.0), Option("e", 400, 0.5)]
    assert [o.grid for o in hull(opts)] == ["a", "d", "e"]


def test_budget_met_and_sensitive_module_upgraded_first():
    # two modules of equal size; "hot" loses 100x more on the small grid, and the budget pays one upgrade
    tables = {"cold": _table([400, 800], [1.0, 0.01]), "hot": _table([400, 800], [100.0, 1.0])}
    weights = {"cold": 100, "hot": 100}
    alloc = allocate(tables, weights, target_bpw=6.0)  # 1200 bits of 200 weights
    assert alloc.grids == {"cold": "g0", "hot": "g1"}
    assert alloc.size_bits == 1200 and alloc.bpw == pytest.approx(6.0)
    assert alloc.error == pytest.approx(2.0)
    # the same budget the other way round upgrades the other module
    swapped = {"cold": tables["hot"], "hot": tables["cold"]}
    assert allocate(swapped, weights, 6.0).grids == {"cold": "g1", "hot": "g0"}


def test_random_tables_stay_within_budget_and_near_the_exhaustive_optimum():
    rng = random.Random(0)
    for _ in range(40):
        tables, weights = {}, {}
        for m in range(4):
            n = rng.choice([64, 128, 256])
            sizes = sorted(rng.sample(range(3 * n, 9 * n), 3))
            errors = sorted((rng.uniform(0.01, 10) for _ in sizes), reverse=True)
            tables[f"m{m}"], weights[f"m{m}"] = _table(sizes, errors), n
        low, high = bpw_range(tables, weights)
        previous = float("inf")
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            target = low + frac * (high - low)
            alloc = allocate(tables, weights, target)
            budget = math.floor(target * sum(weights.values()) + 1e-6)
            assert alloc.size_bits <= budget
            assert alloc.size_bits == sum(next(o.size_bits for o in tables[m] if o.grid == g)
                                          for m, g in alloc.grids.items())
            assert alloc.error <= previous + 1e-12  # more bits never cost accuracy
            previous = alloc.error
            best = _brute(tables, budget)
            assert best <= alloc.error <= best + max(o.error for t in tables.values() for o in t)
        assert allocate(tables, weights, high).error == pytest.approx(sum(min(o.error for o in t)
                                                                           for t in tables.values()))


def test_targets_out_of_range_are_refused():
    tables = {"a": _table([400, 800], [1.0, 0.1])}
    with pytest.raises(BudgetError, match="below the cheapest allocation"):
        allocate(tables, {"a": 100}, 3.99)
    with pytest.raises(BudgetError, match="above the costliest allocation"):
        allocate(tables, {"a": 100}, 8.01)
    with pytest.raises(BudgetError, match="below"):
        allocate(tables, {"a": 100}, float("nan"))
    assert allocate(tables, {"a": 100}, 4.0).grids == {"a": "g0"}


def test_allocation_is_deterministic_under_ties():
    tables = {f"m{k}": _table([400, 800], [2.0, 1.0]) for k in range(5)}
    weights = {m: 100 for m in tables}
    runs = {tuple(sorted(allocate(tables, weights, 6.0).grids.items())) for _ in range(3)}
    assert len(runs) == 1
    (grids,) = runs
    assert [m for m, g in grids if g == "g1"] == ["m0", "m1"]  # ties: by name


def test_stored_bits_counts_what_the_gptq_format_stores():
    # qweight 4 bits per weight, qzeros (groups x out x 4 bits), fp16 scales per group, int32 g_idx per input
    out_f, in_f = 96, 256
    assert stored_bits(out_f, in_f, ModuleGrid(bits=4, group_size=64)) == (
        out_f * in_f * 4 + 4 * out_f * 4 + 4 * out_f * 16 + in_f * 32)
    assert stored_bits(out_f, in_f, ModuleGrid(bits=8, group_size=-1)) == (
        out_f * in_f * 8 + out_f * 8 + out_f * 16 + in_f * 32)


def test_weighted_error_weighs_columns_by_their_second_moment():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    grid = ModuleGrid(bits=4, group_size=32)
    dq = quantize_weight(w, 4, 32, False).dequantize()
    per_col = (w - dq).pow(2).sum(0)
    ms = torch.rand(64)
    assert weighted_error(w, ms, grid, False) == pytest.approx(float((per_col * ms).sum()), rel=1e-6)
    ms_zero = ms.clone()
    ms_zero[:32] = 0  # columns no token reaches cost nothing
    assert weighted_error(w, ms_zero, grid, False) == pytest.approx(float((per_col[32:] * ms[32:]).sum()), rel=1e-6)
    assert weighted_error(w, ms, ModuleGrid(bits=8, group_size=32), False) < weighted_error(w, ms, grid, False) / 100


def test_grids_parse_and_filter_by_divisibility():
    grids = parse_grids("w4g64, w8g128,w8,w4g64")
    assert [g.label for g in grids] == ["w4g64", "w8g128", "w8"]
    for bad in ("w5g64", "w4g48", "4g64", ""):
        with pytest.raises(BudgetError):
            parse_grids(bad)
    tables, weights = size_tables({"a": (64, 192), "b": (64, 256)}, grids)
    assert [o.grid for o in tables["a"]] == ["w4g64", "w8"]  # 128 does not divide 192
    assert [o.grid for o in tables["b"]] == ["w4g64", "w8g128", "w8"]
    assert weights == {"a": 64 * 192, "b": 64 * 256}
    with pytest.raises(BudgetError, match="divides the 96 inputs"):
        size_tables({"c": (64, 96)}, parse_grids("w4g64"))


def test_allocation_record_type():
    alloc = Allocation(grids={"a": "g0"}, size_bits=450, weights=100, error=1.0)
    assert alloc.bpw == 4.5
