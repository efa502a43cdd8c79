"""The library API that the CLI is a thin layer over: quantize, load, inspect, evaluate."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from quantkit.calib.pipeline import Progress
from quantkit.calib.workdir import WorkFolder, run_fingerprint
from quantkit.errors import QuantkitError
from quantkit.formats.shards import DEFAULT_MAX_SHARD_SIZE
from quantkit.loading import resolve_device
from quantkit.memcheck import check_job, plan_job
from quantkit.methods.base import CalibSpec, QuantJob
from quantkit.models.sources import resolve
from quantkit.paths import atomic_dir, check_output, folder_size
from quantkit.plan import MemoryPlan
from quantkit.registry import get_method
from quantkit.scheme import QuantScheme, make_scheme
from quantkit.sizes import parse_size

__all__ = ["quantize", "plan", "make_job"]

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise QuantkitError(f"unknown dtype {name!r}; choose one of: float16, bfloat16, float32")
    return DTYPES[name]


def _scheme(scheme: QuantScheme | str | dict[str, Any] | None) -> QuantScheme:
    if isinstance(scheme, QuantScheme):
        return scheme
    if isinstance(scheme, str):
        return make_scheme(scheme)
    return make_scheme(None, **(scheme or {}))


def make_job(model: str | Path, method: str, *, scheme: QuantScheme | str | dict | None = None,
             calib: CalibSpec | dict[str, Any] | None = None, options: dict[str, Any] | None = None,
             device: str | torch.device = "auto", save_dtype: str | torch.dtype = "float16",
             trust_remote_code: bool = False, progress: Progress | None = None) -> tuple[Any, QuantJob]:
    """The method and the validated job that `quantize` runs (nothing is loaded yet)."""
    impl = get_method(method)
    job = QuantJob(
        source=resolve(model),
        scheme=_scheme(scheme),
        options=impl.Options(**(options or {})),
        calib=calib if isinstance(calib, CalibSpec) else CalibSpec(**(calib or {})),
        device=resolve_device(device),
        save_dtype=resolve_dtype(save_dtype),
        trust_remote_code=trust_remote_code,
        progress=progress,
    )
    if job.source.is_quantized:
        raise QuantkitError(f"{model} is already quantized; give the float model it came from")
    if job.scheme.kv_cache is not None:  # the format must carry it and the attention must be hookable
        from quantkit.calib.kv import check_kv_job

        check_kv_job(impl, job, method)
    return impl, job


def plan(model: str | Path, method: str, **job: Any) -> MemoryPlan:
    """The memory plan of `quantize(model, method, **job)` from config.json and safetensors headers only."""
    return plan_job(make_job(model, method, **job)[1], method)


def _kept(out: Path, work: WorkFolder | None) -> str:
    """What an interrupted run leaves, and how to go on (the CLI's one line after Ctrl-C)."""
    store = work.stored() if work is not None else None
    if store is None or not store.done:
        return f"nothing was written to {out}; run the same command to start again"
    return (f"{store.done} finished block{'s' if store.done > 1 else ''} kept in {work.path}; {out} was not written; "
            f"run the same command to continue (--no-resume starts over)")


def quantize(model: str | Path, method: str, out: str | Path, *, scheme: QuantScheme | str | dict | None = None,
             calib: CalibSpec | dict[str, Any] | None = None, options: dict[str, Any] | None = None,
             device: str | torch.device = "auto", save_dtype: str | torch.dtype = "float16", force: bool = False,
             trust_remote_code: bool = False, progress: Progress | None = None,
             max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, resume: bool | None = None,
             fmt: str | None = None, gguf_type: str | None = None, embed_type: str | None = None,
             target_bpw: float | None = None, target_grids: str | None = None,
             target_sensitivity: str | None = None) -> dict[str, Any]:
    """Quantize `model` with `method` and write a checkpoint folder at `out` (atomically).

    `target_bpw`: choose each Linear's grid among `target_grids` ("w4g64,w8g128,...", default 4- and 8-bit
    in groups of 128/64/32) so the quantized Linears store at most that many bits per weight, by measured
    sensitivity (`quantkit.budget`; `target_sensitivity` "fisher", the default, or "hessian"); written as the
    GPTQ format's per-module `dynamic` config.

    `fmt="gguf"`: write one GGUF file at `out` instead, the method rounding onto each tensor's GGUF type in
    the llama.cpp mix `gguf_type` (default q4_k_m); see `quantize_gguf`.

    `max_shard_size` ("2GB", "500MB" or bytes): larger outputs are split into shards with an index.
    Calibrated methods keep finished blocks in `OUT.partial/` until the save: `resume` None continues
    a matching one (a killed run), False deletes it and starts over.
    Before anything is loaded, the memory plan must fit (`quantkit.memcheck`; QUANTKIT_MEMORY_LIMIT).
    Returns a summary: method, output path, scheme, timings, size on disk and (on CUDA) peak device memory.
    """
    out = Path(out)
    if target_grids is not None and target_bpw is None:
        raise QuantkitError("--target-grids goes with --target-bpw")
    if target_sensitivity is not None and target_bpw is None:
        raise QuantkitError("--target-sensitivity goes with --target-bpw")
    if target_bpw is not None and fmt not in (None, "gptq"):
        raise QuantkitError(f"--target-bpw writes per-module grids as the GPTQ format's dynamic config; it does not "
                            f"apply with --format {fmt}" + (" (--type picks each tensor's grid)" if fmt == "gguf" else ""))
    if fmt == "gguf" and scheme is not None and _scheme(scheme).rotation is not None:
        raise QuantkitError("--rotate does not apply with --format gguf yet (the rotated model's untied output head)")
    if fmt == "gguf":
        return quantize_gguf(model, method, out, gguf_type=gguf_type or "q4_k_m", embed_type=embed_type,
                             scheme=scheme, calib=calib, options=options, device=device, force=force,
                             trust_remote_code=trust_remote_code, progress=progress)
    if gguf_type is not None or embed_type is not None:
        raise QuantkitError("--type and --embed-type go with --format gguf")
    written = get_method(method).check_format(_scheme(scheme), fmt)  # compressed-tensors for --embedding
    check_output(out, force)  # fail before any expensive work
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    impl, job = make_job(model, method, scheme=scheme, calib=calib, options=options, device=device,
                         save_dtype=save_dtype, trust_remote_code=trust_remote_code, progress=progress)
    job.fmt = written if written != impl.output_format(job.scheme) else None
    allocation, t_alloc = None, 0.0
    if target_bpw is not None:
        t_alloc = time.perf_counter()
        allocation = _allocate(impl, job, method, target_bpw, target_grids, target_sensitivity or "fisher")
        t_alloc = time.perf_counter() - t_alloc
    opts = job.options
    memory = check_job(job, method, "offload" in impl.Options.model_fields, out)
    work = WorkFolder(out, lambda: run_fingerprint(job, method), resume) if getattr(impl, "resumable", False) else None
    job.work = work
    torch.manual_seed(job.calib.seed)
    on_cuda = job.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(job.device)
    t0 = time.perf_counter()
    try:
        artifact = impl.quantize(job)
        if job.scheme.kv_cache is not None:  # scales measured on the quantized model, before anything is written
            from quantkit.calib.kv import calibrate_kv

            artifact.kv_scales = calibrate_kv(artifact, job)
        t_quant = time.perf_counter() - t0 + t_alloc
        if allocation is not None:  # recorded in quantkit.json
            artifact.extra["allocation"] = allocation
        peak_device = torch.cuda.max_memory_allocated(job.device) if on_cuda else None
        with atomic_dir(out, force=force) as tmp:
            artifact.save(tmp, shard_bytes)
    except BaseException as exc:
        if work is not None:
            work.close()  # kept: the same command continues from the last finished block
        if isinstance(exc, KeyboardInterrupt):
            exc.__notes__ = [*getattr(exc, "__notes__", []), _kept(out, work)]  # add_note, on Python 3.10 too
        raise
    if work is not None:
        work.close(remove=True)
    summary = {
        "method": method,
        "model": str(model),
        "out": str(out),
        "scheme": job.scheme.model_dump(mode="json") if getattr(impl, "uses_scheme", True) else {"skip": list(job.scheme.skip)},
        "calibration": job.calib.model_dump() if impl.needs_calibration else None,
        "options": opts.model_dump(mode="json"),
        "device": str(job.device),
        "quantize_seconds": round(t_quant, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "size_bytes": folder_size(out),
        "files": sorted(p.name for p in out.iterdir()),
        "resume": work.summary() if work is not None else None,
        "memory_plan_peak_bytes": memory.host if memory is not None else None,
        "peak_device_bytes": peak_device,  # CUDA: torch.cuda.max_memory_allocated while quantizing; None on CPU
    }
    if "moe" in artifact.extra:  # MoE: calibration tokens per expert, and the experts that fell back to RTN
        summary["moe"] = artifact.extra["moe"]
    if allocation is not None:
        summary["allocation"] = {**allocation, "seconds": round(t_alloc, 3)}
    return summary


def _allocate(impl: Any, job: QuantJob, method: str, target_bpw: float, target_grids: str | None,
              sensitivity: str = "fisher") -> dict[str, Any]:
    """--target-bpw: give `job` a grid per Linear (its scheme's overrides); returns the allocation's record."""
    from quantkit.budget.run import budget_scheme
    from quantkit.registry import method_class, method_names

    if not getattr(impl, "module_grids", False) or impl.output_format(job.scheme) != "gptq":
        able = [m for m in method_names() if getattr(method_class(m), "module_grids", False)]
        raise QuantkitError(f"--target-bpw: {method} quantizes every Linear on one grid; per-module grids "
                            f"need {', '.join(able)} (integer weight-only schemes)")
    job.scheme, record = budget_scheme(job, target_bpw, target_grids, sensitivity)
    return record


def quantize_gguf(model: str | Path, method: str, out: Path, *, gguf_type: str = "q4_k_m",
                  embed_type: str | None = None, **job_args: Any) -> dict[str, Any]:
    """Quantize `model` with a method that rounds onto a caller's grid, straight into a GGUF file at `out`.

    Each Linear of the decoder blocks gets the type llama-quantize (with an imatrix) gives it in the mix
    `gguf_type`, and the method rounds onto that type's blocks (`quantkit.convert.ggml_grid`); the rest of
    the file (embedding, norms) is what `quantkit convert --to gguf` writes. No resume: the run is one pass.
    """
    import json

    from quantkit.convert import gguf_provenance_path
    from quantkit.convert.gguf_export import export_gguf, plan_types
    from quantkit.convert.gguf_mix import MIXES
    from quantkit.convert.ggml_grid import GRID_TYPES, BlockCodec
    from quantkit.errors import OutputExistsError
    from quantkit.formats.checkpoint import write_json
    from quantkit.methods.base import GridTarget
    from quantkit.registry import method_class, method_names
    from quantkit.version import __version__

    force = job_args.pop("force", False)
    if out.suffix != ".gguf":
        raise QuantkitError(f"GGUF output {out} must end in .gguf")
    if out.exists() and (not force or not out.is_file()):
        raise OutputExistsError(f"output {out} already exists{'' if out.is_file() else ' and is not a file'}; "
                                "pass --force to overwrite a file")
    if not getattr(method_class(method), "grid_rounding", False):
        able = [m for m in method_names() if getattr(method_class(m), "grid_rounding", False)]
        raise QuantkitError(f"--format gguf needs a method that rounds onto GGUF's grid ({', '.join(able)}); for "
                            f"{method}: quantize to its own format, then `quantkit convert --to gguf`")
    if gguf_type not in MIXES:
        raise QuantkitError(f"--format gguf takes a quantized --type ({', '.join(MIXES)}), not {gguf_type!r}")
    impl, job = make_job(model, method, **job_args)
    if job.scheme.embedding is not None:
        raise QuantkitError("--embedding does not apply with --format gguf: --embed-type sets the embedding's type")
    job.scheme = job.scheme.model_copy(update={"group_size": -1})  # the GGUF types fix the groups, any width fits
    if job.source.kind != "folder":
        raise QuantkitError(f"{model}: --format gguf reads a local HF folder or alias")
    types = plan_types(job.source.path, gguf_type, True, embed_type)
    codecs = {n.removesuffix(".weight"): BlockCodec(q) for n, q in types.items()
              if q in GRID_TYPES and n.endswith(".weight")}
    job.target = GridTarget(codecs, f"gguf {gguf_type}", gguf_type)
    memory = check_job(job, method, "offload" in impl.Options.model_fields, out)
    torch.manual_seed(job.calib.seed)
    t0 = time.perf_counter()
    artifact = impl.quantize(job)
    t_quant = time.perf_counter() - t0
    head = {"quantkit_version": __version__, "quantized_from": str(model), "method": method,
            "target": job.target.label, **artifact.extra}
    # the file carries a short provenance (what made it), the sidecar the whole record (calibration, options):
    # the calibrated file then stays no larger than llama.cpp's imatrix file of the same type
    brief = {k: head[k] for k in ("quantkit_version", "method", "target")}
    facts = export_gguf(job.source.path, out, gguf_type, force=force, provenance=json.dumps(brief, sort_keys=True),
                        progress=job.progress, embed_type=embed_type, encoded=artifact.encoded,
                        floats=artifact.floats)
    write_json(gguf_provenance_path(out), {**head, **facts})
    return {"method": method, "model": str(model), "out": str(out), "format": "gguf", "gguf_type": gguf_type,
            "tensor_types": facts["tensor_types"], "grid_rounded": len(artifact.encoded),
            "calibration": job.calib.model_dump(), "options": job.options.model_dump(mode="json"),
            "device": str(job.device), "quantize_seconds": round(t_quant, 3),
            "total_seconds": round(time.perf_counter() - t0, 3), "size_bytes": out.stat().st_size,
            "files": [out.name], "memory_plan_peak_bytes": memory.host if memory is not None else None}
