"""`quantkit convert`: between plain HF, GPTQ (v1/v2), AWQ GEMM, compressed-tensors pack-quantized and GGUF.

    convert(src, "awq", out)                     exact repack of a GPTQ grid
    convert(src, "gguf", out, gguf_type="q4_1")  llama.cpp file; a 4-bit grid keeps its codes
    convert(src, "hf", out, dtype=torch.float16) dequantize

The pairs and their exactness live in `quantkit.convert.table.TABLE`. Output is atomic:
a failure leaves nothing at `out`. A `quantkit_provenance.json` records what was done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantkit.compute import one_cpu_thread
from quantkit.convert.source import FORMAT_NAMES, float_dtype, format_of, open_checkpoint, read_json
from quantkit.convert.table import TABLE, TARGETS, Conversion, lookup, rows
from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint import write_json
from quantkit.models.sources import read_config, resolve
from quantkit.paths import atomic_dir, check_output
from quantkit.version import __version__

if TYPE_CHECKING:
    from quantkit.calib.pipeline import Progress

log = logging.getLogger(__name__)

PROVENANCE = "quantkit_provenance.json"

__all__ = ["ConvertResult", "convert", "source_format", "rows", "TABLE", "TARGETS", "Conversion", "FORMAT_NAMES"]


@dataclass
class ConvertResult:
    out: Path
    src_format: str
    dst_format: str
    exact: bool
    provenance: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] | None = None


def source_format(src: str | Path) -> str:
    """The conversion-table name of what `src` is (hf, gptq, gptq-v2, awq, compressed-tensors, gguf)."""
    source = resolve(src)
    if source.kind == "gguf":
        return "gguf"
    if source.kind != "folder":
        raise QuantkitError(f"{src}: convert reads local folders, .gguf files and aliases; download the model first")
    return format_of(read_config(Path(source.path)).get("quantization_config"))


def convert(src: str | Path, to: str, out: str | Path, *, dtype: torch.dtype | str = torch.float32,
            gguf_type: str = "f16", imatrix: str | Path | None = None, verify: bool = False,
            verify_windows: int = 4, force: bool = False, device: torch.device | str = "cpu",
            progress: Progress | None = None, calibrate: bool = False, use_imatrix: str | Path | None = None,
            embed_type: str | None = None) -> ConvertResult:
    """Convert `src` to format `to`, written atomically at `out` (a folder, or a .gguf file for gguf).

    `progress(stage, done, total)` is called as tensors are written. Tensor conversion runs on one
    intra-op thread: its byte shuffles are memory-bound, and a second thread only waits (the
    --imatrix calibration and --verify forwards keep every thread).

    GGUF only: `calibrate` rounds with llama.cpp's importance-weighted search fed by quantkit's
    activation statistics of `src`; `use_imatrix` feeds it from a llama.cpp imatrix file instead;
    `embed_type` overrides llama.cpp's choice of the token embedding / output type.
    """
    if (calibrate or use_imatrix is not None or embed_type is not None) and to != "gguf":
        raise QuantkitError("--calibrate, --use-imatrix and --embed-type go with --to gguf")
    if calibrate and use_imatrix is not None:
        raise QuantkitError("give --calibrate (quantkit's statistics) or --use-imatrix FILE, not both")
    gguf_opts = {"calibrate": calibrate, "use_imatrix": use_imatrix, "embed_type": embed_type}
    result = _convert(src, to, out, dtype=dtype, gguf_type=gguf_type, imatrix=imatrix, force=force,
                      device=device, progress=progress, gguf_opts=gguf_opts)
    if verify:
        from quantkit.convert.verify import verify_conversion

        result.verify = verify_conversion(src, out, exact=result.exact and to != "gguf", windows=verify_windows,
                                          device=device)
    return result


def _convert(src: str | Path, to: str, out: str | Path, *, dtype: torch.dtype | str, gguf_type: str,
             imatrix: str | Path | None, force: bool, device: torch.device | str,
             progress: Progress | None, gguf_opts: dict[str, Any] | None = None) -> ConvertResult:
    dtype = float_dtype(dtype)
    out = Path(out)
    src_fmt = source_format(src)
    conv = lookup(src_fmt, to)
    if to == "gguf" and out.suffix != ".gguf":
        raise QuantkitError(f"GGUF output {out} must end in .gguf")
    if to != "gguf":
        check_output(out, force)
    if imatrix is not None and (to != "gguf" or (Path(imatrix).exists() and not force)):
        raise QuantkitError(f"--imatrix goes with --to gguf and a new file; {imatrix} exists or the target is {to}")
    facts: dict[str, Any]
    exact = conv.exact
    if to == "gguf":
        import json

        from quantkit.convert.gguf_export import export_gguf

        opts = gguf_opts or {}
        importance = None
        if opts.get("use_imatrix") is not None:
            from quantkit.convert.imatrix import read_imatrix

            importance = read_imatrix(Path(opts["use_imatrix"]))
        elif opts.get("calibrate"):
            from quantkit.convert.imatrix import compute_importance

            importance = compute_importance(src, device=device)
        head = provenance_record(src, src_fmt, to, conv, conv.exact, dtype, {"gguf_type": gguf_type})
        with one_cpu_thread():
            facts = export_gguf(src, out, gguf_type, force=force, provenance=json.dumps(head, sort_keys=True),
                                progress=progress, importance=importance, embed_type=opts.get("embed_type"))
        if opts.get("use_imatrix") is not None:
            facts["importance"] = str(opts["use_imatrix"])
        elif opts.get("calibrate"):
            facts["importance"] = "quantkit activation statistics (wiki-vital, 32 x 512, seed 0)"
        exact = bool(facts.get("exact", False))
        if imatrix is not None:
            from quantkit.convert.imatrix import write_imatrix

            facts["imatrix"] = write_imatrix(src, Path(imatrix), device=device, force=force)
        write_json(gguf_provenance_path(out), provenance_record(src, src_fmt, to, conv, exact, dtype, facts))
    elif src_fmt == "gguf":
        from quantkit.convert.gguf_import import gguf_to_hf

        with atomic_dir(out, force=force) as tmp, one_cpu_thread():
            facts = gguf_to_hf(Path(resolve(src).path), tmp, dtype)
            _provenance(tmp / PROVENANCE, src, src_fmt, to, conv, exact, dtype, facts)
    else:
        from quantkit.convert.folder import convert_folder

        ck = open_checkpoint(src)
        if to == "hf" and src_fmt != "hf":
            exact = dtype == torch.float32
        elif to == "hf":
            exact = all(i.dtype == dtype or not i.dtype.is_floating_point for i in ck.infos.values())
        with atomic_dir(out, force=force) as tmp, one_cpu_thread():
            facts = convert_folder(ck, to, tmp, dtype, progress=progress)
            prior = read_json(ck.folder / "quantkit.json")
            if prior:
                facts["source_quantkit"] = prior
            _provenance(tmp / PROVENANCE, src, src_fmt, to, conv, exact, dtype, facts)
    return ConvertResult(out, src_fmt, to, exact, facts)


def gguf_provenance_path(out: Path) -> Path:
    """A GGUF output is one file: its provenance record sits beside it."""
    return out.with_name(out.name + "." + PROVENANCE)


def _provenance(path: Path, src: str | Path, src_fmt: str, dst: str, conv: Conversion, exact: bool,
                dtype: torch.dtype, facts: dict[str, Any]) -> None:
    write_json(path, provenance_record(src, src_fmt, dst, conv, exact, dtype, facts))


def provenance_record(src: str | Path, src_fmt: str, dst: str, conv: Conversion, exact: bool, dtype: torch.dtype,
                      facts: dict[str, Any]) -> dict[str, Any]:
    return {
        "quantkit_version": __version__,
        "converted_from": str(src),
        "source_format": src_fmt,
        "target_format": dst,
        "kind": "exact" if exact else "lossy",
        "how": conv.note,
        "dtype": str(dtype).removeprefix("torch."),
        **facts,
    }
