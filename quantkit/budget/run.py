"""`--target-bpw`: measure each Linear's sensitivity on the calibration data, allocate grids to the size
budget, and return the job's scheme with one grid per Linear (QuantScheme.overrides).

Steps: load the float model; the quantized Linears and their candidate grids (sizes only: a target outside
the reachable range is refused before any calibration); the per-input-channel second moments of every
Linear's input (`quantkit.calib.sqsums`, one pass of the job's calibration samples through the float
model); the weighted RTN error of every (Linear, grid) (`quantkit.budget.sensitivity`); the allocation
(`quantkit.budget.allocate`). The scheme's base grid becomes the one most weights got, and every other
Linear an override (the GPTQ format writes those as its `dynamic` config).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import torch

from quantkit.budget.allocate import Allocation, allocate, check_target
from quantkit.budget.fisher import output_fisher
from quantkit.budget.sensitivity import DEFAULT_GRIDS, error_tables, parse_grids, size_tables
from quantkit.calib.data import calibration_samples
from quantkit.calib.sqsums import collect_imatrix
from quantkit.errors import SchemeError
from quantkit.models.arch import blocks_linears, get_arch
from quantkit.models.rotation import rotate_model
from quantkit.models.sources import load_model
from quantkit.scheme import ModuleGrid, QuantScheme

log = logging.getLogger(__name__)


def quantized_linears(model: torch.nn.Module, scheme: QuantScheme) -> dict[str, torch.nn.Linear]:
    """The decoder blocks' Linears the scheme quantizes, by full name."""
    return blocks_linears(model, get_arch(model), scheme.skips)


def scheme_for(scheme: QuantScheme, grids: dict[str, ModuleGrid], weights: dict[str, int]) -> QuantScheme:
    """`scheme` with the grid most weights got as its base and every other Linear's grid as an override."""
    count: Counter[ModuleGrid] = Counter()
    for name, g in grids.items():
        count[g] += weights[name]
    base = max(count, key=lambda g: (count[g], g.label))
    fields = scheme.model_dump()
    fields.update(bits=base.bits, group_size=base.group_size,
                  overrides={n: g for n, g in sorted(grids.items()) if g != base})
    try:
        return QuantScheme(**fields)
    except ValueError as e:
        raise SchemeError(f"--target-bpw: {e}") from None


def summary_line(alloc: Allocation, target: float, uniform: dict[str, float]) -> str:
    mix = Counter(alloc.grids.values())
    parts = ", ".join(f"{g} {n}" for g, n in sorted(mix.items(), key=lambda kv: (-kv[1], kv[0])))
    ref = ", ".join(f"{g} {e / alloc.error:.2f}x" for g, e in uniform.items())
    return (f"--target-bpw {target:g}: {alloc.bpw:.4f} bits per weight stored over {len(alloc.grids)} Linears "
            f"({parts}); weighted error {alloc.error:.4g}" + (f" (uniform {ref})" if ref else ""))


SENSITIVITIES = ("hessian", "fisher")
FISHER_WINDOWS = 16  # calibration windows the Fisher pass reads (a forward and backward each: ~6 CPU s on SmolLM2)


def budget_scheme(job: Any, target_bpw: float, grids_text: str | None = None,
                  sensitivity: str = "fisher") -> tuple[QuantScheme, dict[str, Any]]:
    """The job's scheme with a grid per Linear meeting `target_bpw`, and a record of the allocation.

    `sensitivity`: how a Linear's RTN error is weighed: "fisher" (the default), by its inputs' second moments and
    its outputs' Fisher information (the error's cost at the model's output, `quantkit.budget.fisher`: one forward
    and backward pass of the whole float model per window, on the first FISHER_WINDOWS windows); "hessian", by
    its inputs' second moments only (its own output error)."""
    if sensitivity not in SENSITIVITIES:
        raise SchemeError(f"--target-sensitivity: {sensitivity!r} is not one of {', '.join(SENSITIVITIES)}")
    if job.scheme.overrides:
        raise SchemeError("--target-bpw chooses every Linear's grid; the scheme already has per-module grids")
    grids = parse_grids(grids_text or DEFAULT_GRIDS)
    by_label = {g.label: g for g in grids}
    t0 = time.perf_counter()
    model, tokenizer = load_model(job.source, torch.float32, job.trust_remote_code)
    if job.scheme.rotation is not None:  # weigh the weights the method will round: the rotated ones
        rotate_model(model, get_arch(model), job.scheme.rotation, job.calib.seed)
    linears = quantized_linears(model, job.scheme)
    shapes = {n: (m.out_features, m.in_features) for n, m in linears.items()}
    sizes, weights = size_tables(shapes, grids)
    check_target(sizes, weights, target_bpw)  # before any calibration
    c = job.calib
    samples = calibration_samples(tokenizer, c.dataset, c.nsamples, c.seqlen, c.seed, c.text_field)
    sums = collect_imatrix(model, samples, job.device, c.batch_size)
    mean_sq = {n: s / max(tokens, 1) for n, (s, tokens) in sums.items() if n in linears}
    out_weights = None
    if sensitivity == "fisher":
        out_weights = output_fisher(model, linears, samples[:FISHER_WINDOWS], job.device, seed=c.seed)
    tables = error_tables({n: m.weight for n, m in linears.items()}, mean_sq, grids, job.scheme.sym, out_weights)
    alloc = allocate(tables, weights, target_bpw)
    uniform = {}  # the same Linears on one grid: the error each uniform grid that fits them all would have
    for g in grids:
        opts = [next((o for o in tables[n] if o.grid == g.label), None) for n in tables]
        if all(o is not None for o in opts):
            uniform[g.label] = sum(o.error for o in opts)
    line = summary_line(alloc, target_bpw, uniform)
    log.info("%s in %.1fs", line, time.perf_counter() - t0)
    del model
    scheme = scheme_for(job.scheme, {n: by_label[g] for n, g in alloc.grids.items()}, weights)
    record = {"target_bpw": target_bpw, "sensitivity": sensitivity, "grids": [g.label for g in grids], "bits_per_weight": round(alloc.bpw, 6),
              "weighted_error": alloc.error, "uniform_weighted_error": uniform,
              "mix": dict(sorted(Counter(alloc.grids.values()).items()))}
    return scheme, record
