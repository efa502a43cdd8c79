"""`quantkit quantize`: flags -> scheme, calibration and method options -> `quantkit.api.quantize`.

The command's own options are grouped in help panels; method options come from the chosen method's
Options model (`quantkit methods NAME` lists them) as `--opt KEY=VALUE` or `--KEY VALUE`
(`quantkit.cli.method_options`), so a new method needs no edit here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli.method_options import method_options
from quantkit.cli.options import (Dataset, Device, Force, JsonOut, OutDir, Quiet, Seed, Seqlen, TextField,
                                  TrustRemoteCode, in_panel)
from quantkit.cli.ui import command_quiet, emit_json, progress_bar
from quantkit.errors import QuantkitError
from quantkit.registry import DEFAULT_METHOD
from quantkit.scheme import EMBEDDING_TYPES

MODEL, SCHEME, CALIB, RUN, METHOD = "Model and output", "Scheme", "Calibration", "Run control", "Method options"
EPILOG = ("Method options: --opt KEY=VALUE, or --KEY VALUE (booleans: --KEY / --no-KEY), for the keys "
          "`quantkit methods NAME` lists with their defaults.")


def quantize(
    ctx: typer.Context,
    out: in_panel(OutDir, MODEL),
    model: Annotated[Optional[str], typer.Argument(help="Local HF folder, hub id, .gguf file, or alias (smollm2-135m); optional with --recipe.")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="See `quantkit methods`.", rich_help_panel=MODEL)] = DEFAULT_METHOD,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML (recipes/*.yaml); flags given on the command line override it.", rich_help_panel=MODEL)] = None,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="dtype of unquantized tensors: float16, bfloat16, float32.", rich_help_panel=MODEL)] = "float16",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Split the weights into shards of at most this size (2GB, 500MB, ...), with an index.", rich_help_panel=MODEL)] = "2GB",
    force: in_panel(Force, MODEL) = False,
    trust_remote_code: in_panel(TrustRemoteCode, MODEL) = False,
    preset: Annotated[Optional[str], typer.Option("--preset", help="w4g128, w4g64, w4g32, w3g64, w8; weights and activations in 8 bits (compressed-tensors, for vLLM): w8a8, w8a8-static, fp8-dynamic, fp8.", rich_help_panel=SCHEME)] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="2, 3, 4 or 8.", rich_help_panel=SCHEME)] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Inputs per (scale, zero); -1 = per channel.", rich_help_panel=SCHEME)] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="Symmetric or asymmetric grid.", rich_help_panel=SCHEME)] = None,
    desc_act: Annotated[Optional[bool], typer.Option("--desc-act/--no-desc-act", help="Act-order: quantize columns by decreasing activation (a g_idx in the checkpoint).", rich_help_panel=SCHEME)] = None,
    static_groups: Annotated[Optional[bool], typer.Option("--static-groups/--no-static-groups", help="Fit each group's grid once, before error feedback.", rich_help_panel=SCHEME)] = None,
    observer: Annotated[Optional[str], typer.Option("--observer", help="FP8 weight scales: mse (fp8-dynamic's default: each channel's least-error scale, data-free) or minmax (max|w| / 448, llm-compressor's).", rich_help_panel=SCHEME)] = None,
    kv_cache: Annotated[Optional[str], typer.Option("--kv-cache", help="fp8: also calibrate per-layer FP8 key/value scales for a quantized KV cache (compressed-tensors presets).", rich_help_panel=SCHEME)] = None,
    embedding: Annotated[Optional[str], typer.Option("--embedding", help=f"Store the token embedding (and a tied lm_head) quantized, round-to-nearest: {EMBEDDING_TYPES[0]} (per row) or {EMBEDDING_TYPES[1]} (the scheme's groups); with --format compressed-tensors.", rich_help_panel=SCHEME)] = None,
    rotate: Annotated[Optional[str], typer.Option("--rotate", help="hadamard or random: rotate the residual stream, fused into the weights, before quantizing (QuaRot-style; pre-norm Llama-family models; the output head is then stored untied).", rich_help_panel=SCHEME)] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Module name pattern to keep in full precision (repeatable).", rich_help_panel=SCHEME)] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="compressed-tensors: pack-quantized instead of the method's own format (methods listing it in `quantkit methods`); gguf: write one llama.cpp file (OUT.gguf), the method rounding onto each tensor's GGUF type (methods with grid rounding).", rich_help_panel=SCHEME)] = None,
    gguf_type: Annotated[Optional[str], typer.Option("--type", help="With --format gguf: the llama.cpp mix (q4_k_m, q4_0, iq4_xs, q3_k_m, ...; default q4_k_m).", rich_help_panel=SCHEME)] = None,
    embed_type: Annotated[Optional[str], typer.Option("--embed-type", help="With --format gguf: token embedding / output type instead of llama.cpp's.", rich_help_panel=SCHEME)] = None,
    target_bpw: Annotated[Optional[float], typer.Option("--target-bpw", help="Size budget: choose each Linear's grid (GPTQ format's per-module `dynamic` config) so the quantized Linears store at most this many bits per weight, scales and zeros counted, by measured sensitivity.", rich_help_panel=SCHEME)] = None,
    target_grids: Annotated[Optional[str], typer.Option("--target-grids", help="With --target-bpw: the candidate grids, e.g. w4g128,w4g64,w4g32,w8g128 (the default: 3-, 4- and 8-bit, in groups of 128/64/32 and per channel; w4g128,w4g64,w4g32,w8g128,w8g64,w8g32 for what vLLM's gptq_marlin serves).", rich_help_panel=SCHEME)] = None,
    target_sensitivity: Annotated[Optional[str], typer.Option("--target-sensitivity", help="With --target-bpw: how each Linear's error is weighed: fisher (the default: its inputs' second moments and its outputs' cost at the model's output, from a forward and backward pass of the whole float model on 16 windows) or hessian (its inputs' second moments only).", rich_help_panel=SCHEME)] = None,
    dataset: in_panel(Dataset, CALIB) = "wiki-vital",
    text_field: in_panel(TextField, CALIB) = "text",
    nsamples: Annotated[int, typer.Option("--nsamples", min=1, help="Calibration windows.", rich_help_panel=CALIB)] = 128,
    seqlen: in_panel(Seqlen, CALIB) = 512,
    seed: in_panel(Seed, CALIB) = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Calibration windows per forward.", rich_help_panel=CALIB)] = 8,
    device: in_panel(Device, RUN) = "auto",
    resume: Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="Continue a killed run from OUT.partial/ (default when it exists) or start over.", rich_help_panel=RUN)] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the memory plan (RAM, device, disk per stage) and exit without quantizing.", rich_help_panel=RUN)] = False,
    quiet: in_panel(Quiet, RUN) = False,
    json_out: in_panel(JsonOut, RUN) = None,
    option: Annotated[Optional[list[str]], typer.Option("--opt", "--option", "-O", help="A method option, KEY=VALUE (repeatable); `quantkit methods NAME` lists them.", rich_help_panel=METHOD)] = None,
    method_flag: Annotated[Optional[list[str]], typer.Option("--method-flag", hidden=True)] = None,
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
    options = method_options(impl, option or [], method_flag or [])
    scheme_fields = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups,
                         rotation=rotate)
    if fmt == "gguf" and (preset or any(scheme_fields[k] is not None for k in ("bits", "group_size", "sym", "static_groups"))):
        raise QuantkitError("--preset, --bits, --group-size, --sym/--asym and --static-groups do not apply with "
                            "--format gguf: --type picks each tensor's grid")
    if fmt == "gguf" and rotate is not None:
        raise QuantkitError("--rotate does not apply with --format gguf yet (the rotated model's untied output head)")
    if not getattr(impl, "uses_scheme", True):
        used = [k for k, v in scheme_fields.items() if v is not None] + (["preset"] if preset else [])
        if used:
            flag = {"rotation": "rotate"}.get(used[0], used[0]).replace('_', '-')
            raise QuantkitError(f"--{flag} does not apply to method {method} (its format is fixed)")
    from quantkit.scheme import make_scheme

    scheme = make_scheme(preset or (None if bits else "w4g128"), skip=skip, kv_cache=kv_cache, embedding=embedding,
                         observer=observer, **scheme_fields)
    calib = dict(dataset=dataset, text_field=text_field, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    if plan:  # config.json and safetensors headers only: nothing is loaded or written
        from quantkit.cli.plan import show_plan

        memory = api.plan(model, method, scheme=scheme, calib=calib, options=options, device=device,
                          save_dtype=save_dtype, trust_remote_code=trust_remote_code)
        return show_plan(ui, memory, resolve_device(device), out, json_out)
    with progress_bar(not quiet, f"{method}") as bar:
        summary = api.quantize(model, method, out, scheme=scheme, calib=calib, options=options, device=device,
                               save_dtype=save_dtype, force=force, trust_remote_code=trust_remote_code, progress=bar,
                               max_shard_size=max_shard_size, resume=resume, fmt=fmt, gguf_type=gguf_type,
                               embed_type=embed_type, target_bpw=target_bpw, target_grids=target_grids,
                               target_sensitivity=target_sensitivity)
    if fmt != "gguf" and target_bpw is None:  # recipes have no --target-bpw yet: a uniform one would mislead
        recipe_flags.record_recipe(summary, save_dtype)  # quantkit_recipe.yaml: how to make this checkpoint again
    emit_json(summary, json_out)
    if not quiet and json_out != "-":
        size = summary["size_bytes"] / 2**20
        ui.out.print(f"[green]wrote[/] {summary['out']}  ({size:.1f} MiB, quantized in {summary['quantize_seconds']:.1f} s)")
