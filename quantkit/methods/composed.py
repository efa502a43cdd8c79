"""Methods composed of registered steps (`quantkit.methods.steps`): a few lines of declaration each.

`ComposedMethod` runs its steps in order on every block over the shared block-wise pipeline; its
options are the union of the steps' options and the run's (offload, MoE), its memory the largest of
the steps', its format that of the last (rounding) step.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from quantkit.compute import resolve_calib_dtype
from quantkit.methods.base import QuantJob, RunFacts, describe_moe
from quantkit.methods.blockwise import BlockStep, BlockwiseMethod, RunOptions
from quantkit.methods.steps import compose_memory, get_step, merged_options
from quantkit.models.arch import ArchSpec
from quantkit.models.moe import ExpertCoverage
from quantkit.plan import BlockWork, Geometry, Settings


def composed_options(name: str, steps: tuple[str, ...]) -> type[BaseModel]:
    """The options of a composition: every step's, then the run's."""
    parts = [(get_step(s).Options, tuple(get_step(s).Options.model_fields)) for s in steps]
    return merged_options(name, [*parts, (RunOptions, tuple(RunOptions.model_fields))])


class ComposedMethod(BlockwiseMethod):
    steps: ClassVar[tuple[str, ...]]

    @classmethod
    def block_memory(cls, geometry: Geometry, settings: Settings) -> BlockWork:
        return compose_memory([get_step(s).memory(geometry, settings) for s in cls.steps])

    def block_step(self, job: QuantJob, spec: ArchSpec, coverage: ExpertCoverage) -> BlockStep:
        steps = [get_step(s) for s in self.steps]
        if not steps[-1].rounds or any(s.rounds for s in steps[:-1]):
            raise ValueError(f"{self.name}: the last step, and only it, must round (steps: {', '.join(self.steps)})")
        made = [s.make(job, spec, coverage) for s in steps]

        def step(calib: Any, targets: set[str]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for run in made:
                out.update(run(calib, targets))
            return out

        return step

    def describe(self, job: QuantJob, facts: RunFacts | None = None) -> dict[str, Any]:
        opts = job.options.model_dump(mode="json")
        for s in self.steps:
            opts.update(get_step(s).record(job.options))
        out: dict[str, Any] = {"options": opts, "steps": list(self.steps),
                               "calibration": job.calib.model_dump(mode="json")}
        if facts is not None and facts.samples_sha256:
            out["calibration"]["sha256"] = facts.samples_sha256
        return describe_moe(out, facts)


class AWQGPTQ(ComposedMethod):
    name = "awq-gptq"
    description = "AWQ scales folded into the previous op, then GPTQ rounding of the scaled weights; GPTQ format"
    steps = ("awq-scales", "gptq-rounding")
    Options: ClassVar[type[BaseModel]] = composed_options("AWQGPTQOptions", steps)
    tokenizes_first = True
    replaces_weights = True


class _Smoothing(ComposedMethod):
    """A composition starting with SmoothQuant's smoothing: its blocks calibrate in the `calib_dtype` option's dtype."""

    def calib_dtype(self, job: QuantJob) -> str:
        return resolve_calib_dtype(job.options.calib_dtype, job.device)

    def describe(self, job: QuantJob, facts: RunFacts | None = None) -> dict[str, Any]:
        out = super().describe(job, facts)
        out["options"]["calib_dtype_used"] = self.calib_dtype(job)
        return out


class SmoothQuant(_Smoothing):
    name = "smoothquant"
    description = ("SmoothQuant: activation outliers moved into the weights by per-channel scales (alpha measured "
                   "per block), then GPTQ rounding; for W8A8 / FP8 presets (compressed-tensors)")
    steps = ("smooth", "gptq-rounding")
    Options: ClassVar[type[BaseModel]] = composed_options("SmoothQuantOptions", steps)
    tokenizes_first = True
    replaces_weights = True
    activation_schemes = True
    static_activations = True


class SmoothQuantRTN(_Smoothing):
    name = "smoothquant-rtn"
    description = ("SmoothQuant's smoothing (alpha measured per layer), then round-to-nearest: the fast W8A8 / FP8 "
                   "path (dynamic activation presets; compressed-tensors)")
    steps = ("smooth", "rtn-rounding")
    Options: ClassVar[type[BaseModel]] = composed_options("SmoothQuantRTNOptions", steps)
    tokenizes_first = True
    replaces_weights = True
    activation_schemes = True
