"""Choosing a grid per Linear under a size budget: a pure function of size and error tables.

Each module m has candidate grids c with a stored size S[m][c] (bits: codes, scales, zeros, g_idx, as
`quantkit.formats.stats` counts them) and a measured error E[m][c]. The allocation minimises Σ_m E[m][c_m]
subject to Σ_m S[m][c_m] <= target_bpw * Σ_m n_m (n_m: the module's weights).

Greedy on convex hulls (the classic bit-allocation heuristic, exact when every step fits): each module starts
on its cheapest grid; its candidates that lie on the lower convex hull of (size, error) form a chain of
upgrades, each paying some error removed per extra bit. The best-paying upgrade of any module is taken
while it fits the budget; one that does not fit closes that module's chain, and the next best is tried. Ties break by module name, so the result is deterministic.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass

from quantkit.errors import QuantkitError


class BudgetError(QuantkitError):
    """A size budget no allocation of the candidate grids meets (or one that leaves nothing to choose)."""


@dataclass(frozen=True)
class Option:
    """One candidate grid of one module: its stored size in bits and its measured error."""

    grid: str
    size_bits: int
    error: float


@dataclass(frozen=True)
class Allocation:
    grids: dict[str, str]        # module -> chosen grid
    size_bits: int               # stored bits of the chosen grids
    weights: int                 # weights of the modules
    error: float                 # Σ error of the chosen grids

    @property
    def bpw(self) -> float:
        return self.size_bits / self.weights


def hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (size, error), by increasing size and decreasing error."""
    pts = sorted(options, key=lambda o: (o.size_bits, o.error, o.grid))
    chain: list[Option] = []
    for o in pts:
        if chain and o.error >= chain[-1].error:
            continue  # costs at least as much and is no better
        while len(chain) >= 2:
            a, b = chain[-2], chain[-1]
            # b is above the segment a -> o: the step a -> o pays at least as well per bit as a -> b
            if (a.error - b.error) * (o.size_bits - a.size_bits) <= (a.error - o.error) * (b.size_bits - a.size_bits):
                chain.pop()
            else:
                break
        chain.append(o)
    return chain


def bpw_range(tables: Mapping[str, list[Option]], weights: Mapping[str, int]) -> tuple[float, float]:
    """The smallest and largest bits per weight any allocation stores."""
    total = sum(weights.values())
    low = sum(min(o.size_bits for o in opts) for opts in tables.values())
    high = sum(max(o.size_bits for o in opts) for opts in tables.values())
    return low / total, high / total


def check_target(tables: Mapping[str, list[Option]], weights: Mapping[str, int], target_bpw: float) -> None:
    """BudgetError unless some allocation of the candidates stores at most `target_bpw` and not all of them do
    (sizes only: errors may be unknown yet)."""
    low, high = bpw_range(tables, weights)
    if not math.isfinite(target_bpw) or target_bpw < low - 1e-9:
        raise BudgetError(f"--target-bpw {target_bpw:g} is below the cheapest allocation ({low:.4f} bits per "
                          f"weight, every Linear on its smallest grid); raise it or add smaller grids")
    if target_bpw > high + 1e-9:
        raise BudgetError(f"--target-bpw {target_bpw:g} is above the costliest allocation ({high:.4f} bits per "
                          f"weight, every Linear on its largest grid); lower it or add larger grids")


def allocate(tables: Mapping[str, list[Option]], weights: Mapping[str, int], target_bpw: float) -> Allocation:
    """A grid per module whose stored bits per weight is at most `target_bpw`, at the least total error.

    `tables`: module -> its candidate grids; `weights`: module -> its number of weights.
    Raises BudgetError when the target is below the cheapest allocation or above the costliest one.
    """
    if not tables:
        raise BudgetError("no Linear to allocate grids to")
    missing = sorted(set(tables) - set(weights))
    if missing:
        raise ValueError(f"no weight count for {missing[0]}")
    check_target(tables, weights, target_bpw)
    budget = math.floor(target_bpw * sum(weights.values()) + 1e-6)  # a target computed as bits / weights is met
    chains = {m: hull(opts) for m, opts in tables.items()}
    at = {m: 0 for m in chains}
    used = sum(c[0].size_bits for c in chains.values())

    def push(heap: list, m: str) -> None:
        c, k = chains[m], at[m]
        if k + 1 < len(c):
            gain, cost = c[k].error - c[k + 1].error, c[k + 1].size_bits - c[k].size_bits
            heapq.heappush(heap, (-gain / cost, m))

    heap: list[tuple[float, str]] = []
    for m in sorted(chains):
        push(heap, m)
    while heap:
        _, m = heapq.heappop(heap)
        c, k = chains[m], at[m]
        extra = c[k + 1].size_bits - c[k].size_bits
        if used + extra > budget:
            continue  # this module's next step does not fit: its chain closes
        used += extra
        at[m] = k + 1
        push(heap, m)
    grids = {m: chains[m][at[m]].grid for m in sorted(chains)}
    error = sum(chains[m][at[m]].error for m in chains)
    return Allocation(grids=grids, size_bits=used, weights=sum(weights[m] for m in chains), error=error)
