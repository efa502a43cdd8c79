"""Size and error tables for the allocator: what each candidate grid costs and loses on each Linear.

Size: the bits the GPTQ format stores for the Linear on that grid (qweight, qzeros, scales, g_idx: the
tensors `quantkit.formats.stats` counts).
Error: the calibration-activation-weighted quantization error of round-to-nearest on that grid,
    Σ_j E[x_j²] · Σ_i (W_ij − Q(W)_ij)²
(i: output row, j: input column), the diagonal of the Linear's Hessian XᵀX/n applied to the weight
error: the expected squared output error per token, with the off-diagonal terms dropped.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from quantkit.budget.allocate import BudgetError, Option
from quantkit.formats.layouts import GPTQLayout
from quantkit.grid import quantize_weight
from quantkit.scheme import ModuleGrid

# 3-, 4- and 8-bit grids, in groups of 128/64/32 and per channel: with the Fisher sensitivity (the default) the
# allocation at w4g64's size reached KL 0.75x uniform w4g64's, against 0.95x with 4/8-bit groups only; with the
# diagonal-Hessian sensitivity the same wide set lost (1.46x), so MARLIN_GRIDS were its default
# (benchmarks/results/target_bpw.md). 3-bit Linears are served by gptqmodel and quantkit, not by gptq_marlin.
DEFAULT_GRIDS = "w3g128,w3g64,w3g32,w4,w4g128,w4g64,w4g32,w8,w8g128,w8g64,w8g32"
MARLIN_GRIDS = "w4g128,w4g64,w4g32,w8g128,w8g64,w8g32"  # 4 and 8 bits in groups: what vLLM's gptq_marlin serves
_GRID = re.compile(r"w(\d+)(?:g(\d+))?")


def parse_grids(text: str) -> list[ModuleGrid]:
    """"w4g64,w8g128,w8" -> grids (no g: one group per output channel), in the order given, duplicates dropped."""
    out: list[ModuleGrid] = []
    for part in (p.strip() for p in text.split(",")):
        m = _GRID.fullmatch(part)
        if m is None:
            raise BudgetError(f"--target-grids: {part!r} is not a grid like w4g64 (bits, group size) or w8 "
                              "(per channel)")
        try:
            grid = ModuleGrid(bits=int(m[1]), group_size=int(m[2]) if m[2] else -1)
        except ValueError:
            raise BudgetError(f"--target-grids: {part} is not a grid quantkit writes (bits 2, 3, 4 or 8; "
                              "group size a multiple of 32)") from None
        if grid not in out:
            out.append(grid)
    if not out:
        raise BudgetError("--target-grids names no grid")
    return out


def fits(grid: ModuleGrid, in_features: int) -> bool:
    return grid.group_size == -1 or in_features % grid.group_size == 0


def stored_bits(out_features: int, in_features: int, grid: ModuleGrid) -> int:
    """Bits the GPTQ format stores for one Linear on `grid` (bias not included, as stats counts it)."""
    shapes = GPTQLayout().shapes(out_features, in_features, grid.bits, grid.group_size)
    return sum(math.prod(shape) * dtype.itemsize * 8 for shape, dtype in shapes.values())


def weighted_error(weight: Tensor, mean_sq: Tensor, grid: ModuleGrid, sym: bool,
                   out_weight: Tensor | None = None) -> float:
    """Σ_j mean_sq[j] · Σ_i out_weight[i] (W − RTN(W))²_ij for `weight` (out, in) on `grid` (`out_weight`: each
    output's cost at the model's output, `quantkit.budget.fisher`; None: every output counts 1)."""
    w = weight.detach().float()
    q = quantize_weight(w, grid.bits, grid.group_size, sym).dequantize(torch.float32)
    err = (w - q).pow(2).double()
    if out_weight is not None:
        err = err * out_weight.double().to(err.device)[:, None]
    return float((err.sum(0) * mean_sq.double().to(err.device)).sum())


def size_tables(shapes: dict[str, tuple[int, int]], grids: list[ModuleGrid]) -> tuple[dict[str, list[Option]],
                                                                                     dict[str, int]]:
    """{module: candidate Options with sizes and error 0}, {module: weights}, from (out, in) shapes.

    A module keeps the candidates whose group size divides its inputs; none left is a BudgetError."""
    tables, weights = {}, {}
    for name, (out_f, in_f) in shapes.items():
        opts = [Option(g.label, stored_bits(out_f, in_f, g), 0.0) for g in grids if fits(g, in_f)]
        if not opts:
            raise BudgetError(f"no grid of --target-grids divides the {in_f} inputs of {name}")
        tables[name], weights[name] = opts, out_f * in_f
    return tables, weights


def error_tables(weights: dict[str, Tensor], mean_sq: dict[str, Tensor], grids: list[ModuleGrid],
                 sym: bool, out_weights: dict[str, Tensor] | None = None) -> dict[str, list[Option]]:
    """{module: Options with stored size and weighted RTN error} for each fitting candidate grid
    (`out_weights`: per-output costs, see `weighted_error`)."""
    tables: dict[str, list[Option]] = {}
    for name in sorted(weights):
        w = weights[name]
        out_f, in_f = w.shape
        ow = None if out_weights is None else out_weights[name]
        tables[name] = [Option(g.label, stored_bits(out_f, in_f, g), weighted_error(w, mean_sq[name], g, sym, ow))
                        for g in grids if fits(g, in_f)]
    return tables
