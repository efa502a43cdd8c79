"""`quantkit convert`: a thin wrapper over quantkit.convert."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.options import Device, Force, JsonOut, Quiet
from quantkit.cli.ui import command_quiet, emit_json, emit_table, progress_bar


def convert(ctx: typer.Context,
            src: Annotated[Optional[str], typer.Argument(help="Model to convert: a plain or packed checkpoint folder, .gguf file or alias.")] = None,
            out: Annotated[Optional[Path], typer.Argument(help="Output folder, or a .gguf file for --to gguf.")] = None,
            to: Annotated[str, typer.Option("--to", help="Target format: hf (plain), a packed format or gguf; `--list` shows every source -> target.")] = "hf",
            dtype: Annotated[str, typer.Option("--dtype", help="--to hf: float32, float16 or bfloat16.")] = "float32",
            gguf_type: Annotated[str, typer.Option("--type", help="--to gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, or a llama.cpp mix: q2_k, q3_k_s|m|l, q4_k_s|m, q5_k_s|m, q6_k, iq4_nl, iq4_xs.")] = "f16",
            imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="--to gguf: also write llama.cpp's importance matrix here.")] = None,
            calibrate: Annotated[bool, typer.Option("--calibrate", help="--to gguf: round with llama.cpp's importance-weighted search, fed by quantkit's activation statistics (wiki-vital, 32 x 512).")] = False,
            use_imatrix: Annotated[Optional[Path], typer.Option("--use-imatrix", help="--to gguf: the same search fed by a llama.cpp imatrix file (llama-imatrix's or --imatrix's).")] = None,
            embed_type: Annotated[Optional[str], typer.Option("--embed-type", help="--to gguf: type of the token embedding and output instead of llama.cpp's choice (e.g. f16, q8_0).")] = None,
            verify: Annotated[bool, typer.Option("--verify", help="Reload the output and compare its logits with the source's.")] = False,
            list_table: Annotated[bool, typer.Option("--list", help="Print the conversion table and exit.")] = False,
            device: Device = "cpu", force: Force = False, quiet: Quiet = False, json_out: JsonOut = None) -> None:
    """Convert between plain HF, GPTQ, AWQ, compressed-tensors and GGUF (exact where the grid allows)."""
    from quantkit.convert import convert as run
    from quantkit.convert import rows
    from quantkit.errors import QuantkitError

    ui = ctx.obj
    quiet = command_quiet(ui, quiet)
    if list_table:
        _print_table(ui, rows(), json_out)
        return
    if src is None or out is None:
        raise QuantkitError("quantkit convert needs SRC and OUT (or --list); e.g. quantkit convert SRC --to FORMAT OUT")
    from quantkit.loading import resolve_device

    with progress_bar(not quiet and json_out != "-", "convert") as bar:
        result = run(src, to, out, dtype=dtype, gguf_type=gguf_type, imatrix=imatrix, verify=verify,
                     force=force, device=resolve_device(device), progress=bar, calibrate=calibrate,
                     use_imatrix=use_imatrix, embed_type=embed_type)
    summary = {"out": str(result.out), "from": result.src_format, "to": result.dst_format,
               "kind": "exact" if result.exact else "lossy", **result.provenance, "verify": result.verify}
    emit_json(summary, json_out)
    if json_out == "-" or quiet:
        return
    line = f"[green]wrote[/] {result.out} ({result.src_format} -> {result.dst_format}, {summary['kind']})"
    if "added_error" in result.provenance:
        e = result.provenance["added_error"]
        line += f", re-quantized: rel RMSE {e['rel_rmse']:.2e}"
    ui.out.print(line)
    if result.verify is not None:
        v = result.verify
        ui.out.print(f"verify: max |dlogit| {v['max_abs_logit']:.3g}, KL {v['kl']:.3g}, top-1 {v['top1']:.4f} "
                     f"over {v['windows']} windows")


def _print_table(ui, table: list[dict[str, str]], json_out: str | None) -> None:
    emit_table(ui, table, json_out, "quantkit convert", table,
               {col: (lambda r, c=col: r[c]) for col in ("from", "to", "kind", "how")})
