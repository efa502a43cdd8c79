"""The memory plan of a quantization run, from config.json and the safetensors headers only (no weights).

`estimate(geometry, settings, ...)` is a pure function: per stage, the expected peak host RAM,
device memory and temporary disk. What dominates each stage (fp32 bytes unless said otherwise):

- baseline:    the interpreter with torch imported (measured: the caller's RSS) + transformers +
               the loaded tokenizer;
- calibration: tokenizing the calibration text (a transient of ~TOKENIZE_PER_CHAR bytes per character);
- model load:  every weight as fp32, or with `--offload disk` only the tensors outside the blocks;
- block:       one block's weights, its inputs and outputs (nsamples x seqlen x hidden x 4 each), the
               forward transients of one batch (attention scores batch x heads x T x T, MLP intermediate
               batch x T x inter) and the method's own: GPTQ's per-group Hessians (in^2) and its
               working copies of the stacked weights (the inputs it records for replay take the
               outputs' slot); AWQ's statistics (Gram matrices, token sample), recorded attention
               calls and candidate grids;
- save:        the packed output, streamed one tensor at a time (RTN holds all codes until then);
- disk:        the work folder (packed finished blocks + two activation files) and the output.

The constants below were fitted against measured peak RSS (ru_maxrss) with benchmarks/big.py;
the plan is meant to be within 25% of it and not below by more than 10%.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MiB = 2**20
F32 = 4
F64 = 8
# Measured on CPU (torch 2.13, transformers 5.24, glibc), see benchmarks/big.py:
TRANSFORMERS_IMPORT = 30 * MiB  # transformers and its auto classes, when not imported yet
TOKENIZER_FIXED = 50 * MiB      # the tokenization modules and a loaded fast tokenizer ...
TOKENIZER_PER_BYTE = 24         # ... plus this much per byte of tokenizer.json (smollm2: 2 MB -> +50 MiB)
TOKENIZE_PER_CHAR = 135         # transient RSS per character of calibration text while it is tokenized
RUNTIME = 60 * MiB              # modeling code, weight loading machinery, first-use buffers of torch's kernels
FORWARD_FACTOR = 2              # a batch's forward transients as seen in RSS, over the tensors it allocates
ALLOCATOR_SLACK = 1.10          # freed-but-not-returned heap (glibc arenas) on everything allocated
AWQ_CHUNK = 1 << 24             # methods/awq.py _CHUNK_ELEMENTS: floats in one batch of candidate weights
AWQ_GRID = 20                   # methods/awq.py AWQConfig.n_grid: candidate scales per mapping
AWQ_KEEP = 4                    # methods/awq.py SCREEN_KEEP + alpha 0: candidates re-scored on the whole sample
AWQ_SCORE_TOKENS = 2048         # methods/awq.py AWQConfig.score_tokens
BNB_METHODS = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class Geometry:
    """What the plan needs to know about a model, from its config and tensor headers."""

    n_blocks: int
    hidden: int
    heads: int
    inter: int                              # MLP intermediate width (largest Linear output in a block)
    block_params: int                       # parameters of the largest block
    groups: tuple[tuple[int, int], ...]     # largest block's Linear groups as (stacked rows, in_features)
    linears: tuple[tuple[int, int], ...]    # every quantizable Linear of one block as (out, in)
    outside_params: int                     # parameters outside the blocks (embeddings, final norm, head)
    mapped: bool                            # fp32 on disk: transformers maps the file instead of copying it
    max_tensor: int                         # largest tensor, elements


@dataclass(frozen=True)
class Settings:
    """The run's choices that move memory."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    offload: bool = False
    device: str = "cpu"
    save_dtype_bytes: int = 2
    true_sequential: bool = True
    calib_dtype_bytes: int = 4      # the dtype blocks compute in while calibrated (GPTQ --calib-dtype)


@dataclass(frozen=True)
class Stage:
    name: str
    host: int       # peak host RAM during the stage, bytes (whole process)
    device: int     # peak device memory (0 on CPU, where it is host RAM)
    disk: int       # temporary disk in use (work folder + output being written)
    detail: str     # what dominates


@dataclass(frozen=True)
class MemoryPlan:
    stages: tuple[Stage, ...]
    settings: Settings
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.host)

    @property
    def host(self) -> int:
        return max(s.host for s in self.stages)

    @property
    def device(self) -> int:
        return max(s.device for s in self.stages)

    @property
    def disk(self) -> int:
        return max(s.disk for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [asdict(s) for s in self.stages], "settings": asdict(self.settings),
                "peak_host_bytes": self.host, "peak_device_bytes": self.device, "peak_disk_bytes": self.disk,
                "notes": list(self.notes)}


# ------------------------------------------------------------------------------------- geometry
def _numel(shape: list[int] | tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def blocks_prefix(config: dict[str, Any], names: list[str]) -> str:
    """The dotted path of the decoder blocks: from the architecture table, else the commonest `x.N.` prefix."""
    from quantkit.models.arch import ARCHITECTURES

    arch = (config.get("architectures") or [""])[0]
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch].blocks
    counts: dict[str, int] = {}
    for n in names:
        if m := re.match(r"^(.*?)\.\d+\.", n):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return max(counts, key=counts.__getitem__) if counts else "model.layers"


def geometry(config: dict[str, Any], header: dict[str, tuple[str, tuple[int, ...]]]) -> Geometry:
    """`header`: tensor name -> (safetensors dtype code, shape), over all shards (`formats.shards.raw_header`)."""
    from quantkit.models.arch import ARCHITECTURES

    text = config.get("text_config") or config
    prefix = blocks_prefix(config, list(header)) + "."
    per_block: dict[int, dict[str, tuple[int, ...]]] = {}
    outside = 0
    for name, (_, shape) in header.items():
        if name.startswith(prefix):
            i = int(name[len(prefix):].split(".", 1)[0])
            per_block.setdefault(i, {})[name[len(prefix):].split(".", 1)[1]] = shape
        else:
            outside += _numel(shape)
    if not per_block:
        raise ValueError(f"no tensors under {prefix}N.: cannot find the decoder blocks")
    big = max(per_block.values(), key=lambda b: sum(_numel(s) for s in b.values()))
    linears = {n.removesuffix(".weight"): s for n, s in big.items() if n.endswith(".weight") and len(s) == 2}
    arch = ARCHITECTURES.get((config.get("architectures") or [""])[0])
    groups: list[tuple[int, int]] = []
    seen: set[str] = set()
    for names in arch.sequential if arch is not None else ():
        present = [n for n in names if n in linears]
        if present:
            groups.append((sum(linears[n][0] for n in present), linears[present[0]][1]))
            seen.update(present)
    groups += [(s[0], s[1]) for n, s in linears.items() if n not in seen and "embed" not in n]
    hidden = int(text.get("hidden_size") or text.get("d_model") or max(s[1] for s in linears.values()))
    heads = int(text.get("num_attention_heads") or text.get("n_head") or max(1, hidden // 64))
    inter = max([s[0] for s in linears.values()] + [int(text.get("intermediate_size") or 0)])
    return Geometry(
        n_blocks=len(per_block), hidden=hidden, heads=heads, inter=inter,
        block_params=sum(_numel(s) for s in big.values()), groups=tuple(groups),
        linears=tuple((s[0], s[1]) for n, s in linears.items() if "embed" not in n),
        outside_params=outside,
        mapped=all(d == "F32" for n, (d, _) in header.items() if n.startswith(prefix)),
        max_tensor=max(_numel(s) for _, s in header.values()),
    )


# ------------------------------------------------------------------------------------- estimate
def packed_bytes(out_f: int, in_f: int, bits: int, group_size: int) -> int:
    """Codes, zeros, fp16 scales and g_idx of one Linear in a packed checkpoint."""
    groups = 1 if group_size == -1 else max(1, in_f // group_size)
    return out_f * in_f * bits // 8 + groups * out_f * (bits / 8 + 2) + in_f * 4


def _awq_grid_elements(g: Geometry, rows: int, in_f: int, budget: int) -> int:
    """Floats alive at once while AWQ scores the candidate scales of one mapping, whose Linears are a group
    (`rows` stacked outputs, `in_f` inputs: S = rows * in_f weights). `awq.best_scale` scores the candidates
    in chunks of k = min(n_grid, _CHUNK_ELEMENTS // S), so k * S <= 64 MiB once chunked; alive then:
    - making them (`scaled_fake_quant`, one Linear after the other): the chunk's candidates of the Linears
      before, and for the current one (largest L = out * in) W * s plus two (k, out, in) temporaries of
      `fake_quantize` (w / scale, round): k * S + 2 * k * L, at most 3 * k * S;
    - scoring one Linear (`LinearEvaluator`, o_proj / down_proj): the candidates, W_hat - W and x @ d^T with
      its square (step, n, rows) for its own chunks of candidates, on n = budget / 4 screening tokens (then
      at most AWQ_KEEP candidates on the whole budget).
    Module evaluators (attention, MLP) run one sequence or a quarter of the sample: below the block forward.
    smollm2 down_proj (576 x 1536): k = 18, 3 * k * S = 191 MB, where 7 * 64 MiB (the factor this replaced)
    gave 448 MiB against ~450 MiB measured for the whole transient (session 4)."""
    size = rows * in_f
    k = min(AWQ_GRID, max(1, AWQ_CHUNK // size))
    largest = max([o * i for o, i in g.linears if i == in_f and o <= rows] or [size])
    make = k * size + 2 * k * largest
    if largest < size:  # a stacked group is scored by running its module (ModuleEvaluator), not as a Linear
        return make
    score = 0
    for kk, n in ((k, max(1, budget // 4)), (min(k, AWQ_KEEP), budget)):  # screening, then the kept ones
        step = min(kk, max(1, AWQ_CHUNK // (n * rows)))  # LinearEvaluator's own chunk of candidates
        score = max(score, kk * size + step * size + 2 * step * n * rows)
    return max(make, score)


def _block_method_bytes(g: Geometry, s: Settings) -> tuple[int, str]:
    """The method's own working memory while one block is calibrated, and a description."""
    n_tok = s.nsamples * s.seqlen
    if s.method == "gptq":  # the inputs it records to replay the next group share the outputs' slot
        # after the forward that fed a group's Hessian H (in x in, float32): inverse_cholesky holds H and at
        # most two float64 in x in matrices; then the column loop holds H, its inverse factor and five
        # (rows x in) float32 work tensors (W, Q, errors, ...)
        return max(max(i * i * F32 + 2 * i * i * F64, 2 * i * i * F32 + 5 * r * i * F32)
                   for r, i in g.groups), "Hessian + GPTQ work"
    if s.method == "awq":
        budget = min(AWQ_SCORE_TOKENS, n_tok // 4)
        sites = sum(i for _, i in g.groups)
        gs = s.group_size if s.group_size != -1 else 128
        stats = sites * (gs + budget) * F32                                  # Gram matrices + token sample
        calls = 2 * max(budget, s.seqlen) * g.hidden * F32 * 4               # attention calls and their outputs
        grid = max(_awq_grid_elements(g, r, i, budget) for r, i in g.groups) * F32
        return stats + calls + grid, "statistics + scale grid"
    return 0, ""


def recording_affordable(in_features: int, out_features: int, itemsize: int) -> bool:
    """Whether GPTQ's shortcut may record a Linear's inputs (tokens x in_features x itemsize): at most two
    float32 copies of its output width, what the pipeline keeps anyway (down_proj's float32 inputs would
    add 0.2 GB at 64 x 512 on smollm2 and 1.4 GB at 7B). Used by `quantkit.calib.shortcut` and the plan."""
    return in_features * itemsize <= 2 * out_features * F32


def _recorded_bytes(g: Geometry, s: Settings) -> int:
    """GPTQ's shortcuts keep, for every calibration token, the inputs of o_proj (hidden wide) and, when
    affordable, of down_proj (intermediate wide), in the calibration dtype."""
    if s.method != "gptq":
        return 0
    cb = s.calib_dtype_bytes
    width = g.hidden + (g.inter if recording_affordable(g.inter, g.hidden, cb) else 0)
    return s.nsamples * s.seqlen * width * cb


def _forward_bytes(g: Geometry, s: Settings) -> int:
    """Transients of one block forward on one batch: attention scores or MLP intermediates, whichever is
    larger, plus the hidden-sized temporaries (norm, residual, q/k/v), times what the allocator keeps."""
    b = min(s.batch_size, s.nsamples)
    attn = b * g.heads * s.seqlen * s.seqlen * F32           # scores (eager; sdpa's math path the same)
    mlp = b * s.seqlen * g.inter * F32 * 3                   # gate, up, act(gate) * up
    return FORWARD_FACTOR * (max(attn, mlp) + 4 * b * s.seqlen * g.hidden * F32)


def _slack(rss_now: int, total: int) -> int:
    """`total` plus the allocator's share of everything allocated after `rss_now`."""
    return int(total + (ALLOCATOR_SLACK - 1) * max(0, total - rss_now))


def estimate(g: Geometry, s: Settings, baseline: int, tokenizer_bytes: int = 0, text_chars: int = 0,
             transformers_loaded: bool = False) -> MemoryPlan:
    """Per-stage peaks of a run (bytes). `baseline`: the process's RSS now (torch imported)."""
    cpu = s.device == "cpu"
    base = baseline + (0 if transformers_loaded else TRANSFORMERS_IMPORT)
    base += TOKENIZER_FIXED + TOKENIZER_PER_BYTE * tokenizer_bytes if tokenizer_bytes else 0
    calibrated = s.method in ("gptq", "awq")
    tokenize = TOKENIZE_PER_CHAR * text_chars if calibrated else 0
    model = (g.outside_params if s.offload else g.outside_params + g.n_blocks * g.block_params) * F32 + RUNTIME
    # AWQ assigns new (scaled) weights block by block while the mapped file's pages stay resident: RSS grows
    # by one block's Linears per block (smollm2: 27 MB per block, 651 -> 1413 MiB over 29 blocks), so this is
    # there at the last block and the save, not at the load (measured before block 0: 1050 MiB, session 5)
    awq_mapped = s.method == "awq" and g.mapped and not s.offload
    grown = g.n_blocks * sum(o * i for o, i in g.linears) * F32 if awq_mapped else 0
    block = g.block_params * F32
    # --offload disk: the peak inside a block still creeps up with depth while RSS at each block's end stays
    # flat. Measured (random Llama, hidden 2048, GPTQ 16 x 512, 1 thread, final code): 2081 MiB at 3 blocks,
    # 2319 MiB at 24 (11 MB per block; 16 MB before steady_heap and the leaner inverse_cholesky). Not traced
    # to a cause (runs under a 5 ms RSS sampler stayed flat): one hidden x hidden float32 matrix per block
    # (16 MiB at 2048, 0.25 MiB for the hidden 256 test models).
    creep = g.n_blocks * g.hidden * g.hidden * F32 if s.offload else 0
    acts = s.nsamples * s.seqlen * g.hidden * F32
    big = g.max_tensor * (F32 + s.save_dtype_bytes)  # the largest tensor read or touched, and cast for the save
    packed_block = sum(packed_bytes(o, i, s.bits, s.group_size) for o, i in g.linears)
    other_block = max(0, g.block_params - sum(o * i for o, i in g.linears)) * s.save_dtype_bytes
    out_bytes = int(g.n_blocks * (packed_block + other_block) + g.outside_params * s.save_dtype_bytes)
    work = int(g.n_blocks * (packed_block + other_block) + 2 * acts) if calibrated else 0

    def stage(name: str, host: int, detail: str, device: int = 0, disk: int = 0) -> Stage:
        return Stage(name, _slack(baseline, host), device, disk, detail)

    stages = [Stage("baseline", base, 0, 0, "python + torch + transformers + tokenizer")]
    if calibrated:  # GPTQ tokenizes before the model is loaded (folder sources); AWQ after
        stages.append(stage("calibration data", base + (model if s.method == "awq" else 0) + tokenize,
                            "tokenizing the calibration text"))
    what = "tensors outside the blocks (--offload disk)" if s.offload else "every weight as fp32"
    stages.append(stage("model load", base + model + g.max_tensor * F32, what))
    if calibrated:
        method, mdesc = _block_method_bytes(g, s)
        # activations stay on the host (store_device); the device holds the block, one batch and the method's work
        forward = _forward_bytes(g, s)
        if s.method == "gptq":  # its work runs between forwards: only the Hessian being fed overlaps a forward
            work_or_forward = max(forward + max(i * i * F32 for _, i in g.groups), method)
        else:  # AWQ scores candidates by running parts of the block: statistics and grids meet the forward
            work_or_forward = forward + method
        on_device = (block if s.offload or not cpu else 0) + work_or_forward
        host = (base + model + grown + creep + 2 * acts + _recorded_bytes(g, s)
                + (on_device if cpu else block if s.offload else 0))
        stages.append(stage("block + activations", host,
                            f"1 block + inputs and outputs ({acts / MiB:.0f} MiB each) + {mdesc}",
                            0 if cpu else on_device, work))
        stages.append(stage("save", base + model + grown + big, "streamed: one tensor at a time",
                            disk=work + out_bytes))
    elif s.method in BNB_METHODS:  # quantized while transformers loads it; save_pretrained writes from memory
        linear = g.n_blocks * sum(o * i for o, i in g.linears)
        loaded = linear * s.bits // 8 + (g.outside_params + g.n_blocks * g.block_params - linear) * s.save_dtype_bytes
        stages[-1] = stage("model load", base + RUNTIME + loaded + g.max_tensor * F32,
                           "quantized on load (bitsandbytes)")
        stages.append(stage("save", base + RUNTIME + 2 * loaded, "transformers save_pretrained", disk=out_bytes))
    else:  # RTN: every Linear's codes (uint8) and grids are held until the save
        codes = g.n_blocks * sum(o * i + 2 * o * (1 if s.group_size == -1 else i // s.group_size) * F32
                                 for o, i in g.linears)
        rtn_tmp = 4 * max(o * i for o, i in g.linears) * F32
        stages.append(stage("quantize", base + model + codes + rtn_tmp, "all codes held in memory"))
        stages.append(stage("save", base + model + codes + big, "streamed, codes held until written",
                            disk=out_bytes))
    notes = []
    if calibrated:
        notes.append(f"activations grow with --nsamples x --seqlen: {acts / MiB:.0f} MiB per copy at "
                     f"{s.nsamples} x {s.seqlen}")
    return MemoryPlan(tuple(stages), s, tuple(notes))


def alternatives(g: Geometry, s: Settings, can_offload: bool) -> list[tuple[str, Settings]]:
    """Smaller settings to suggest, cheapest change first: (flags, settings)."""
    out: list[tuple[str, Settings]] = []
    bases = [("", s)]
    if can_offload and not s.offload:
        bases.append(("--offload disk", replace(s, offload=True)))
    out += bases[1:]
    for flag, b in bases:
        n = b.nsamples // 2
        while n >= 8:
            out.append(((flag + " " if flag else "") + f"--nsamples {n}", replace(b, nsamples=n)))
            n //= 2
        t = b.seqlen // 2
        while t >= 128:
            out.append(((flag + " " if flag else "") + f"--seqlen {t}", replace(b, seqlen=t)))
            t //= 2
    return out
