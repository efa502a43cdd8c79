"""The memory plan of a quantization run, from config.json and the safetensors headers only (no weights).

`estimate(geometry, settings, ...)` is a pure function: per stage, the expected peak host RAM,
device memory and temporary disk. What dominates each stage (fp32 bytes unless said otherwise):

- baseline:    the interpreter with torch imported (measured: the caller's RSS) + transformers +
               the loaded tokenizer;
- calibration: tokenizing the calibration text (a transient of ~TOKENIZE_PER_CHAR bytes per character);
- model load:  every weight as fp32, or with `--offload disk` only the tensors outside the blocks;
- block:       one block's weights, its inputs and outputs (nsamples x seqlen x hidden x 4 each), the
               forward transients of one batch (attention scores batch x heads x T x T, MLP intermediate
               batch x T x inter) and the method's own working memory (`BlockWork`, which each method
               declares as a function of the block's geometry and the settings: see its `block_memory`);
- save:        the packed output, streamed one tensor at a time (a method without calibration holds all
               codes until then; one that quantizes at load time writes with transformers);
- disk:        the work folder (packed finished blocks + two activation files) and the output.

The plan never names a method: what it needs to know about one (does it calibrate, does it quantize at
load time, when does it tokenize, its per-block work) it reads from the method's declarations, found by
name through `quantkit.registry`.

The constants below were fitted against measured peak RSS (ru_maxrss) with benchmarks/big.py;
the plan is meant to be within 25% of it and not below by more than 10%.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from quantkit.registry import method_class

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
    vocab: int = 0                          # vocabulary size (config), for the end-to-end stage's logits


@dataclass(frozen=True)
class Settings:
    """The run's choices that move memory."""

    method: str                     # a registered method name: the plan reads that method's declarations
    bits: int = 4
    group_size: int = 128
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    offload: bool = False
    device: str = "cpu"
    save_dtype_bytes: int = 2
    true_sequential: bool = True
    calib_dtype_bytes: int = 4      # the dtype blocks compute in while calibrated (the method's calib_dtype)
    hessians: int = 1               # in x in float32 products fed per Linear group (GPTQ: 2-3 with its target options)
    float_stream: bool = False      # the pipeline carries the float model's stream beside the quantized one
    e2e_windows: int = 0            # calibration windows per end-to-end step after the blocks (0: no such stage)
    e2e_embedding: bool = False     # the end-to-end stage tunes the token embedding / output layer too
    e2e_headers: bool = False       # the stage tunes a block format's float headers (GGUF), not GPTQ's group scales
    gradient_pass: bool = False     # a whole-model forward and backward per window before the blocks (Fisher)


@dataclass(frozen=True)
class BlockWork:
    """A calibrated method's own memory while one block is calibrated, as the method declares it.

    work:    bytes at the method's peak inside a block;
    forward: how much of it is alive while the block runs a forward (a method whose work runs between
             forwards declares only what a forward feeds, e.g. one Hessian; one that scores candidates
             by running parts of the block declares all of its work);
    kept:    host bytes kept over the block's passes for every calibration token (recorded inputs);
    detail:  what dominates, for the plan's table.
    The block stage then holds forward transients + max(forward share + forward, work), plus `kept`.
    """

    work: int = 0
    forward: int = 0
    kept: int = 0
    detail: str = ""


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
        vocab=int(text.get("vocab_size") or 0),
    )


# ------------------------------------------------------------------------------------- estimate
def packed_bytes(out_f: int, in_f: int, bits: int, group_size: int) -> int:
    """Codes, zeros, fp16 scales and g_idx of one Linear in a packed checkpoint."""
    groups = 1 if group_size == -1 else max(1, in_f // group_size)
    return out_f * in_f * bits // 8 + groups * out_f * (bits / 8 + 2) + in_f * 4


def _block_method_bytes(g: Geometry, s: Settings) -> tuple[int, str]:
    """The method's own working memory while one block is calibrated, and a description."""
    work = method_class(s.method).block_memory(g, s)
    return work.work, work.detail


def _forward_bytes(g: Geometry, s: Settings) -> int:
    """Transients of one block forward on one batch: attention scores or MLP intermediates, whichever is
    larger, plus the hidden-sized temporaries (norm, residual, q/k/v), times what the allocator keeps."""
    b = min(s.batch_size, s.nsamples)
    attn = b * g.heads * s.seqlen * s.seqlen * F32           # scores (eager; sdpa's math path the same)
    mlp = b * s.seqlen * g.inter * F32 * 3                   # gate, up, act(gate) * up
    return FORWARD_FACTOR * (max(attn, mlp) + 4 * b * s.seqlen * g.hidden * F32)


LOGIT_CHUNK = 256  # tokens whose logits the end-to-end stage holds at once (E2EParams.logit_chunk)
LOGIT_COPIES = 7  # vocabulary-wide float32 tensors alive per chunk: both logits and their float casts, the
                  # log-softmaxes, the teacher's probabilities, the KL's terms and the gradient


def _e2e_bytes(g: Geometry, s: Settings) -> tuple[int, int]:
    """Beyond the loaded model, the end-to-end stage's two peaks (`quantkit.methods.e2e`):

    - float model: that model loaded again (float32), its final hidden states on every calibration window (in
      the stage's dtype), and one batch's forward; the block stage's codes are held;
    - tuning: the codes as float32 (and a grouped copy in the stage's dtype when that is not float32), every
      quantized weight materialized in the stage's dtype and kept for the backward pass, the scales' Adam state,
      the graph of the whole model on one step's windows (about 12 hidden-wide and 4 intermediate-wide
      activations per token and block, as the block stage's), the teacher's hidden states, one chunk of logits,
      and the output layer cast to the stage's dtype; and the float model's weights again: freed before the
      tuning, but the allocator keeps its pages (measured peaks: SmolLM2 GPTQ + e2e, float32, 4784 / 6005 MiB
      at 2 / 4 windows a step, this plan 4921 / 6606; SignRound + e2e, bf16, 4059 / 4878 against 4099 / 4943;
      Gemma 3 270M SignRound + e2e, bf16, 7110 against 6834). With the embedding tuned (`e2e_embedding`): its
      gradient, the head's gradient summed in float32 over the chunks, and Adam's two moments, four
      vocabulary x hidden float32 tensors (one embedding: tied, as on the models measured)."""
    wb = s.calib_dtype_bytes
    linear = g.n_blocks * sum(o * i for o, i in g.linears)
    per_group = 1 if s.group_size == -1 else max(1, s.group_size)
    held = linear * (1 + 24 / per_group)                   # uint8 codes; zeros, scales and Adam's state per group
    if s.e2e_headers:  # GGUF: the bytes, and each weight's min part b (float32; its scale part is counted below)
        held = linear * (1 + F32)
    teacher_h = s.nsamples * s.seqlen * g.hidden * wb
    weights = (g.outside_params + g.n_blocks * g.block_params) * F32
    forward = _forward_bytes(g, replace(s, batch_size=s.e2e_windows))
    tokens = s.e2e_windows * s.seqlen
    graph = g.n_blocks * tokens * (12 * g.hidden + 4 * g.inter) * wb
    logits = LOGIT_CHUNK * g.vocab * F32 * LOGIT_COPIES
    head = g.vocab * g.hidden * wb if wb != F32 else 0
    tuning = (weights + held + linear * F32 + (linear * wb if wb != F32 else 0) + linear * wb + graph + teacher_h
              + logits + head + tokens * g.hidden * F32 + (4 * g.vocab * g.hidden * F32 if s.e2e_embedding else 0))
    return int(weights + teacher_h + held + forward), int(tuning)


def _gradient_pass_bytes(g: Geometry, s: Settings) -> int:
    """Beyond the loaded model, a whole-model forward and backward on one window (`quantkit.calib.fisher`): the
    graph's activations (the end-to-end stage's per-token count, float32), the logits with their softmax, cast
    and gradient, and the hidden states' gradients. Not measured on its own: the runs that have it also run the
    end-to-end stage, whose peak is larger."""
    graph = g.n_blocks * s.seqlen * (12 * g.hidden + 4 * g.inter) * F32
    return int(graph + 4 * s.seqlen * g.vocab * F32 + 2 * s.seqlen * g.hidden * F32)


def _slack(rss_now: int, total: int) -> int:
    """`total` plus the allocator's share of everything allocated after `rss_now`."""
    return int(total + (ALLOCATOR_SLACK - 1) * max(0, total - rss_now))


def estimate(g: Geometry, s: Settings, baseline: int, tokenizer_bytes: int = 0, text_chars: int = 0,
             transformers_loaded: bool = False) -> MemoryPlan:
    """Per-stage peaks of a run (bytes). `baseline`: the process's RSS now (torch imported)."""
    cpu = s.device == "cpu"
    base = baseline + (0 if transformers_loaded else TRANSFORMERS_IMPORT)
    base += TOKENIZER_FIXED + TOKENIZER_PER_BYTE * tokenizer_bytes if tokenizer_bytes else 0
    method = method_class(s.method)
    calibrated = method.needs_calibration
    tokenize = TOKENIZE_PER_CHAR * text_chars if calibrated else 0
    model = (g.outside_params if s.offload else g.outside_params + g.n_blocks * g.block_params) * F32 + RUNTIME
    # A method that assigns new weight tensors block by block (`replaces_weights`: scaled weights) while the
    # mapped file's pages stay resident: RSS grows by one block's Linears per block (smollm2: 27 MB per block,
    # 651 -> 1413 MiB over 29 blocks), so this is there at the last block and the save, not at the load
    # (measured before block 0: 1050 MiB, session 5)
    mapped_growth = method.replaces_weights and g.mapped and not s.offload
    grown = g.n_blocks * sum(o * i for o, i in g.linears) * F32 if mapped_growth else 0
    block = g.block_params * F32
    # --offload disk: the peak inside a block still creeps up with depth while RSS at each block's end stays
    # flat. Measured (random Llama, hidden 2048, 16 x 512 Hessian calibration, 1 thread, final code): 2081 MiB at 3 blocks,
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
    if calibrated:  # `tokenizes_first`: before the model is loaded (folder sources); else beside it
        stages.append(stage("calibration data", base + (0 if method.tokenizes_first else model) + tokenize,
                            "tokenizing the calibration text"))
    what = "tensors outside the blocks (--offload disk)" if s.offload else "every weight as fp32"
    stages.append(stage("model load", base + model + g.max_tensor * F32, what))
    if calibrated and s.gradient_pass:
        grads = _gradient_pass_bytes(g, s)
        stages.append(stage("gradient pass", base + model + (grads if cpu else 0),
                            "the whole model's forward and backward on one window (Fisher)",
                            device=0 if cpu else model + grads))
    if calibrated:
        own = method.block_memory(g, s)
        # activations stay on the host (store_device); the device holds the block, one batch and the method's work
        work_or_forward = max(_forward_bytes(g, s) + own.forward, own.work)
        on_device = (block if s.offload or not cpu else 0) + work_or_forward
        host = (base + model + grown + creep + 2 * acts + own.kept
                + (on_device if cpu else block if s.offload else 0))
        stages.append(stage("block + activations", host,
                            f"1 block + inputs and outputs ({acts / MiB:.0f} MiB each) + {own.detail}",
                            0 if cpu else on_device, work))
        if s.e2e_windows:
            teacher, tuning = _e2e_bytes(g, s)  # on an accelerator the stage runs there, the model moved to it
            stages.append(stage("end-to-end: float model", base + model + (teacher if cpu else 0),
                                "the float model loaded again, its hidden states on every window",
                                device=0 if cpu else model + teacher))
            stages.append(stage("end-to-end: tuning", base + model + (tuning if cpu else 0),
                                f"codes, weights and the whole model's graph on {s.e2e_windows} windows",
                                device=0 if cpu else model + tuning))
        stages.append(stage("save", base + model + grown + big, "streamed: one tensor at a time",
                            disk=work + out_bytes))
    elif method.quantizes_on_load:  # quantized while transformers loads it; save_pretrained writes from memory
        linear = g.n_blocks * sum(o * i for o, i in g.linears)
        loaded = linear * s.bits // 8 + (g.outside_params + g.n_blocks * g.block_params - linear) * s.save_dtype_bytes
        stages[-1] = stage("model load", base + RUNTIME + loaded + g.max_tensor * F32,
                           "quantized on load")
        stages.append(stage("save", base + RUNTIME + 2 * loaded, "transformers save_pretrained", disk=out_bytes))
    else:  # no calibration: every Linear's codes (uint8) and grids are held until the save
        codes = g.n_blocks * sum(o * i + 2 * o * (1 if s.group_size == -1 else i // s.group_size) * F32
                                 for o, i in g.linears)
        tmp = 4 * max(o * i for o, i in g.linears) * F32
        stages.append(stage("quantize", base + model + codes + tmp, "all codes held in memory"))
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
