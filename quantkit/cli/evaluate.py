"""`quantkit eval`: quality, speed, memory and size of checkpoints in one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.options import Dataset, Device, JsonOut, Quiet, TextField
from quantkit.cli.ui import command_quiet, emit_json, progress_bar


def eval_cmd(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Checkpoints (GPTQ, AWQ, bitsandbytes), HF folders, .gguf files or aliases.")],
    base: Annotated[Optional[str], typer.Option("--base", help="The float model they came from (KL, top-1, Δppl, relative speed).")] = None,
    dataset: Dataset = "wiki-vital",
    text_field: TextField = "text",
    split: Annotated[str, typer.Option("--split", help="auto, tail (last 200,000 characters) or all (whole split, the GPTQ/AWQ papers' WikiText-2 convention); auto = all for a datasets id ending in :test or :validation.")] = "auto",
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", min=8, help="Tokens per window (default 2048 on CUDA, 512 on CPU).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="Sliding window: start a window every STRIDE tokens and score only tokens the previous one did not (default: --seqlen, non-overlapping).")] = None,
    max_windows: Annotated[int, typer.Option("--max-windows", min=0, help="Windows scored (0 = all).")] = 40,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16.")] = "auto",
    speed: Annotated[bool, typer.Option("--speed", help="Also measure TTFT, decode TPS and batched throughput (takes time).")] = False,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt tokens for the speed runs.")] = 128,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=2, help="New tokens per speed run.")] = 64,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of the throughput run.")] = 8,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs after warm-up (the median is quoted).")] = 3,
    context: Annotated[Optional[int], typer.Option("--context", min=1, help="Also report memory at this context length: stored weights + KV cache (KV bytes per token x N).")] = None,
    device: Device = "auto",
    kernel: Annotated[str, typer.Option("--kernel", help="Kernel that serves load, memory and speed: auto (fastest per layer), reference, or a name from quantkit.kernels (quality is always scored on the exact maths: the dense kernel, bit-identical to reference).")] = "auto",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse the base's results cached by content hash.")] = True,
    cache_gb: Annotated[float, typer.Option("--cache-gb", min=0.0, help="Disk budget for the base's log-prob spill and cache; above it the base is recomputed beside each model.")] = 8.0,
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the table as Markdown.")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="Also draw ppl (or --plot-metric) vs size on disk to this PNG.")] = None,
    plot_metric: Annotated[str, typer.Option("--plot-metric", help="ppl or kl.")] = "ppl",
    keep_going: Annotated[bool, typer.Option("--keep-going", help="Exit 0 even when a checkpoint failed (by default a failed row makes the exit code 1, after every row is printed).")] = False,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """Perplexity, KL / top-1 against --base, speed and memory of each checkpoint, in one table."""
    from quantkit.eval.plot import METRICS, plot
    from quantkit.cli.results import report_failures, row_printer, show_result
    from quantkit.eval.report import markdown
    from quantkit.eval.runner import evaluate_paths
    from quantkit.eval.speed import SpeedConfig
    from quantkit.errors import QuantkitError

    if plot_out is not None and plot_metric not in METRICS:
        raise QuantkitError(f"unknown --plot-metric {plot_metric!r}; choose one of: {', '.join(METRICS)}")
    if plot_out is not None and plot_out.suffix.lower() != ".png":
        raise QuantkitError(f"--plot {plot_out}: the plot is a PNG; give a file name ending in .png")
    ui = ctx.obj
    quiet = command_quiet(ui, quiet)
    speed_cfg = SpeedConfig(prompt_len, gen_tokens, batch, repeats) if speed else None
    with progress_bar(not quiet, "eval") as bar:
        result = evaluate_paths(paths, base=base, dataset=dataset, seqlen=seqlen, max_windows=max_windows or None,
                                device=device, text_field=text_field, progress=bar, stride=stride, split=split,
                                dtype=dtype, speed=speed_cfg, cache=cache, cache_budget_gb=cache_gb,
                                kernel=kernel, on_row=row_printer(bar), context=context)
    emit_json(result, json_out)
    if markdown_out is not None:
        markdown_out.write_text(markdown(result))
    if plot_out is not None:
        plot(result, plot_out, plot_metric)
    if not quiet and json_out != "-":
        show_result(ui, result)
    report_failures(ui, result, keep_going, shown=not quiet)
