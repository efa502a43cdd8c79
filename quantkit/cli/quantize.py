"""`quantkit quantize`: flags -> scheme, calibration and method options -> `quantkit.api.quantize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from quantkit.cli.options import (Dataset, Device, Force, JsonOut, OutDir, Quiet, Seed, Seqlen, TextField,
                                  TrustRemoteCode)
from quantkit.cli.ui import command_quiet, emit_json, progress_bar
from quantkit.errors import QuantkitError

OPT = "Method options"


def _method_options(impl: Any, given: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """Keep the flags that were given; refuse those the method does not take."""
    fields = impl.Options.model_fields
    opts: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in fields:
            raise QuantkitError(f"--{key.replace('_', '-')} does not apply to method {impl.name}")
        opts[key] = value
    for item in extra:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            valid = ", ".join(fields) or "none"
            raise QuantkitError(f"-O {item}: expected KEY=VALUE with KEY one of the {impl.name} options ({valid})")
        opts[key] = value
    try:
        impl.Options(**opts)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"]).replace("_", "-")
        raise QuantkitError(f"--{loc}: {e['msg'].removeprefix('Value error, ')}") from None
    return opts


def quantize(
    ctx: typer.Context,
    out: OutDir,
    model: Annotated[Optional[str], typer.Argument(help="Local HF folder, hub id, .gguf file, or alias (smollm2-135m); optional with --recipe.")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="See `quantkit methods`.")] = "rtn",
    preset: Annotated[Optional[str], typer.Option("--preset", help="w4g128, w4g64, w4g32, w3g64 or w8.")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="2, 3, 4 or 8.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Inputs per (scale, zero); -1 = per channel.")] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="Symmetric or asymmetric grid.")] = None,
    desc_act: Annotated[Optional[bool], typer.Option("--desc-act/--no-desc-act", help="GPTQ act-order.")] = None,
    static_groups: Annotated[Optional[bool], typer.Option("--static-groups/--no-static-groups")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Module name pattern to keep in full precision (repeatable).")] = None,
    dataset: Dataset = "wiki-vital",
    text_field: TextField = "text",
    nsamples: Annotated[int, typer.Option("--nsamples", min=1, help="Calibration windows.")] = 128,
    seqlen: Seqlen = 512,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Calibration windows per forward.")] = 8,
    device: Device = "auto",
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="dtype of unquantized tensors: float16, bfloat16, float32.")] = "float16",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Split the weights into shards of at most this size (2GB, 500MB, ...), with an index.")] = "2GB",
    resume: Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="Continue a killed run from OUT.partial/ (default when it exists) or start over.")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the memory plan (RAM, device, disk per stage) and exit without quantizing.")] = False,
    damp: Annotated[Optional[float], typer.Option("--damp", help="GPTQ dampening, fraction of the mean Hessian diagonal.", rich_help_panel=OPT)] = None,
    true_sequential: Annotated[Optional[bool], typer.Option("--true-sequential/--no-true-sequential", rich_help_panel=OPT)] = None,
    act_group_aware: Annotated[Optional[bool], typer.Option("--act-group-aware/--no-act-group-aware", help="GPTQ group-aware reordering without desc_act (default on; the format is unchanged).", rich_help_panel=OPT)] = None,
    calib_dtype: Annotated[Optional[str], typer.Option("--calib-dtype", help="GPTQ: dtype blocks compute in while calibrating (float32, bfloat16, float16); Hessians stay float32.", rich_help_panel=OPT)] = None,
    offload: Annotated[Optional[str], typer.Option("--offload", help="none, or disk: load blocks lazily from the shards.", rich_help_panel=OPT)] = None,
    n_grid: Annotated[Optional[int], typer.Option("--n-grid", help="AWQ grid points.", rich_help_panel=OPT)] = None,
    max_shrink: Annotated[Optional[float], typer.Option("--max-shrink", help="AWQ clipping search range.", rich_help_panel=OPT)] = None,
    zero_point: Annotated[Optional[bool], typer.Option("--zero-point/--no-zero-point", help="AWQ asymmetric grid.", rich_help_panel=OPT)] = None,
    dump_awq: Annotated[Optional[Path], typer.Option("--dump-awq", help="Save the AWQ search result (safetensors).", rich_help_panel=OPT)] = None,
    load_awq: Annotated[Optional[Path], typer.Option("--load-awq", help="Reapply a saved AWQ search result.", rich_help_panel=OPT)] = None,
    double_quant: Annotated[Optional[bool], typer.Option("--double-quant/--no-double-quant", rich_help_panel=OPT)] = None,
    compute_dtype: Annotated[Optional[str], typer.Option("--compute-dtype", help="bnb compute dtype: bf16, fp16, fp32.", rich_help_panel=OPT)] = None,
    quant_storage: Annotated[Optional[str], typer.Option("--quant-storage", rich_help_panel=OPT)] = None,
    int8_threshold: Annotated[Optional[float], typer.Option("--int8-threshold", help="LLM.int8 outlier threshold.", rich_help_panel=OPT)] = None,
    moe_calibration: Annotated[Optional[str], typer.Option("--moe-calibration", help="MoE experts' statistics: routed (the router's tokens) or all (every token; outputs stay routed).", rich_help_panel=OPT)] = None,
    moe_min_tokens: Annotated[Optional[int], typer.Option("--moe-min-tokens", help="An MoE expert that saw fewer calibration tokens is quantized with RTN (default 16).", rich_help_panel=OPT)] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-O", help="Any other method option, KEY=VALUE.", rich_help_panel=OPT)] = None,
    force: Force = False,
    quiet: Quiet = False,
    json_out: JsonOut = None,
    trust_remote_code: TrustRemoteCode = False,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML (recipes/*.yaml); flags given on the command line override it.")] = None,
) -> None:
    """Quantize MODEL with a method and write a checkpoint folder."""
    from quantkit import api
    from quantkit.loading import resolve_device
    from quantkit.registry import get_method
    from quantkit.zoo import flags as recipe_flags

    if recipe is not None:  # recipe values under the flags given, then the same command without --recipe
        return quantize(**recipe_flags.recipe_params(recipe, ctx))
    if model is None:
        raise QuantkitError("give MODEL (a folder, hub id, .gguf file or alias) or --recipe FILE")

    ui = ctx.obj
    quiet = command_quiet(ui, quiet)
    impl = get_method(method)
    given = dict(damp=damp, true_sequential=true_sequential, act_group_aware=act_group_aware, offload=offload, n_grid=n_grid, max_shrink=max_shrink,
                 zero_point=zero_point, dump_awq=dump_awq, load_awq=load_awq, double_quant=double_quant,
                 compute_dtype=compute_dtype, quant_storage=quant_storage, int8_threshold=int8_threshold,
                 moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens, calib_dtype=calib_dtype)
    options = _method_options(impl, given, option or [])
    scheme_fields = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups)
    if not getattr(impl, "uses_scheme", True):
        used = [k for k, v in scheme_fields.items() if v is not None] + (["preset"] if preset else [])
        if used:
            raise QuantkitError(f"--{used[0].replace('_', '-')} does not apply to method {method} (its format is fixed)")
    from quantkit.scheme import make_scheme

    scheme = make_scheme(preset or (None if bits else "w4g128"), skip=skip, **scheme_fields)
    calib = dict(dataset=dataset, text_field=text_field, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    if plan:  # config.json and safetensors headers only: nothing is loaded or written
        from quantkit.cli.plan import show_plan

        memory = api.plan(model, method, scheme=scheme, calib=calib, options=options, device=device,
                          save_dtype=save_dtype, trust_remote_code=trust_remote_code)
        return show_plan(ui, memory, resolve_device(device), out, json_out)
    with progress_bar(not quiet, f"{method}") as bar:
        summary = api.quantize(model, method, out, scheme=scheme, calib=calib, options=options, device=device,
                               save_dtype=save_dtype, force=force, trust_remote_code=trust_remote_code, progress=bar,
                               max_shard_size=max_shard_size, resume=resume)
    recipe_flags.record_recipe(summary, save_dtype)  # quantkit_recipe.yaml: how to make this checkpoint again
    emit_json(summary, json_out)
    if not quiet and json_out != "-":
        size = summary["size_bytes"] / 2**20
        ui.out.print(f"[green]wrote[/] {summary['out']}  ({size:.1f} MiB, quantized in {summary['quantize_seconds']:.1f} s)")
