"""Kernels against the reference QuantLinear: every registered kernel of the device, on every layer shape.

`check_kernels` walks `quantkit.kernels.KERNELS` (a kernel added to the registry later is checked with no
edit here) over the Linear shapes of the models the run uses, the schemes below, the GPTQ and AWQ layouts
and the activation dtypes of `check_dtypes`, with the tolerances of tests/unit/test_kernels.py (one table for both).
`logit_check` compares a checkpoint's logits on the served kernels (kernel="auto") with the reference module's.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # tests/ lives beside scripts/: the kernel tests' helpers and tolerances
    sys.path.insert(0, str(ROOT))

from quantkit.formats.qlinear import QuantLinear  # noqa: E402
from quantkit.kernels import KERNELS, kernels_used, spec_of  # noqa: E402
from tests.unit.test_kernels import layouts_for, make_qw, rel_err, tolerance  # noqa: E402

log = logging.getLogger("gpucheck.kernels")

# (bits, group_size, sym, act_order): the presets the run quantizes with (w4g128; w4g64 where 128 does not divide
# the inputs), then the other paths kernels take. A group that does not divide a layer's inputs is skipped there.
SCHEMES = [(4, 128, False, False), (4, 64, False, False), (4, 64, True, False), (4, 64, False, True),
           (3, 64, False, False), (8, -1, False, False), (8, 64, False, False)]
ROWS = (1, 33)                # activation rows: one decode token, and a prefill-sized odd batch
# ||Δlogits|| / ||logits|| through a whole model on a bf16/fp16 kernel: rounding compounds over the layers
# (smollm2-135m RTN w4g64 on cpu-int4 measured 6.7e-2 on 16 tokens, 3.9e-2 in benchmarks/results/kernels.md),
# a wrong packing gives about 1. The per-layer walk holds each kernel to its compute dtype's tight tolerance.
FAST_LOGIT_TOL = 0.15
EXACT_LOGIT_TOL = 1e-4        # reference or dense: the same maths


@dataclass
class KernelSummary:
    kernel: str
    status: str = "ok"            # ok | FAIL | unavailable | served none
    served: int = 0
    refused: int = 0
    worst_rel: float = 0.0        # largest relative error over the cases it served
    worst_ratio: float = 0.0      # largest error / tolerance (a pass is < 1)
    max_abs: float = 0.0          # largest |Δ| of an output element
    note: str = ""                # why unavailable, or the first refusal / failure
    failures: list[str] = field(default_factory=list)


def check_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The unit tests' float32 and bfloat16, and on CUDA float16 too (what eval runs there)."""
    return (torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32, torch.bfloat16)


def _case_name(shape: tuple[int, int], scheme: tuple, layout, dtype: torch.dtype) -> str:
    bits, group, sym, act = scheme
    return (f"{shape[0]}x{shape[1]} w{bits}g{group}{'s' if sym else 'a'}{'-act' if act else ''} "
            f"{layout.name} {str(dtype).removeprefix('torch.')}")


def check_kernels(shapes: list[tuple[int, int]], device: torch.device) -> list[KernelSummary]:
    """Every kernel of the registry that runs on `device`, against the reference module, on every case."""
    kernels = {name: cls for name, cls in KERNELS.items() if device.type in cls.devices}
    out = {name: KernelSummary(name) for name in kernels}
    for name, cls in kernels.items():
        missing = cls.unavailable()
        if missing:
            out[name].status, out[name].note = "unavailable", missing
    live = {n: c for n, c in kernels.items() if out[n].status == "ok"}
    for si, shape in enumerate(shapes):
        for ci, scheme in enumerate(SCHEMES):
            bits, group, sym, act = scheme
            if group != -1 and shape[1] % group:
                continue
            qw = make_qw(*shape, bits, group, sym, act, seed=100 * si + ci)
            for layout in layouts_for(bits, act):
                ref = QuantLinear.from_quantized(qw, layout).to(device)
                gen = torch.Generator().manual_seed(si * 31 + ci)
                xs = [torch.randn(m, shape[1], generator=gen).to(device) for m in ROWS]
                with torch.no_grad():
                    wants = [ref(x) for x in xs]  # float32 reference maths
                for dtype in check_dtypes(device):
                    spec = spec_of(ref.quantized(), device, dtype)
                    for name, cls in live.items():
                        _one_case(out[name], cls, ref, layout, device, dtype, spec, xs, wants,
                                  _case_name(shape, scheme, layout, dtype))
                del ref
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the quantize subprocesses come next
    for s in out.values():
        if s.status == "ok" and s.failures:
            s.status, s.note = "FAIL", s.failures[0]
        elif s.status == "ok" and not s.served:
            s.status = "served none"
    return list(out.values())


def _one_case(summary: KernelSummary, cls, ref: QuantLinear, layout, device: torch.device, dtype: torch.dtype,
              spec, xs: list[torch.Tensor], wants: list[torch.Tensor], case: str) -> None:
    try:
        reason = cls.check(spec)
        if reason is not None:
            summary.refused += 1
            summary.note = summary.note or f"refuses {case}: {reason}"
            return
        tol = tolerance(cls, dtype)
        mod = cls(ref.quantized(), layout, device, dtype)
        with torch.no_grad():
            for x, want in zip(xs, wants):
                got = mod(x.to(dtype))
                if got.dtype != dtype or got.shape != want.shape:
                    raise AssertionError(f"returned {got.dtype} {tuple(got.shape)}, want {dtype} {tuple(want.shape)}")
                err = rel_err(got, want)
                summary.worst_rel = max(summary.worst_rel, err)
                summary.worst_ratio = max(summary.worst_ratio, err / tol)
                summary.max_abs = max(summary.max_abs, float((got.float() - want.float()).abs().max()))
                if not err < tol:  # NaN fails too
                    raise AssertionError(f"rel err {err:.2e} >= {tol:g} at {x.shape[0]} rows")
        summary.served += 1
    except Exception as e:  # noqa: BLE001 - a broken kernel is a finding, the walk goes on
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        summary.failures.append(f"{case}: {first}")
        log.error("%s %s: %s", summary.kernel, case, first)


def summaries_json(summaries: list[KernelSummary]) -> list[dict]:
    return [asdict(s) for s in summaries]


def logit_check(path: str | Path, device: torch.device, dtype: torch.dtype, n_tokens: int) -> dict:
    """max |Δlogit| and ||Δ||/||ref|| of a checkpoint on kernel="auto" against kernel="reference", same dtype."""
    import quantkit

    def logits(model) -> torch.Tensor:
        ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return model(ids.to(device), use_cache=False).logits[0].float()

    ref = quantkit.load(path, device=device, dtype=dtype, kernel="reference").eval()
    want = logits(ref)
    del ref
    fast = quantkit.load(path, device=device, dtype=dtype, kernel="auto", pack_cache=False).eval()
    used = kernels_used(fast)
    got = logits(fast)
    del fast
    if device.type == "cuda":
        torch.cuda.empty_cache()
    diff = got - want
    rel = float(diff.norm() / want.norm())
    tol = EXACT_LOGIT_TOL if set(used) <= {"reference", "dense"} else FAST_LOGIT_TOL
    return {"kernels": used, "max_abs_dlogit": float(diff.abs().max()), "rel_dlogit": rel, "tolerance": tol,
            "ok": bool(rel < tol), "logit_scale": float(want.abs().max())}
