"""Benchmark: quantkit's kernels against fp32/bf16 dense matmuls, per layer and end to end.

1. Per-layer matmul time at batch 1 and 16 for smollm2-135m's Linear shapes and for a
   1B-shaped (TinyLlama: 2048/5632, 4 kv heads) and a 7B-shaped (4096/11008) Llama layer,
   random weights: fp32 and bf16 `F.linear`, the reference QuantLinear, and every CPU kernel.
2. Decode tokens/s (batch 1, KV cache) and prefill tokens/s for smollm2-135m and a ~1B
   random Llama written to a temporary folder (deleted afterwards): fp32, bf16, RTN w4g64
   through each kernel, RTN w8 (per channel) through cpu-int8. All variants of a model are
   resident together and timed round-robin, so ratios are taken side by side on this shared machine.
3. Load time of the quantized checkpoints with kernel="reference", with each kernel on a first
   load (it packs, and writes the packed-weight cache) and on a later load (it reads that cache;
   the cache folder is the temporary one, so every run starts cold). The timed model is the cached
   load's, checked to give the packing load's logits exactly.

The machine is shared: run it under the heavy-job lock. The table goes to benchmarks/results/kernels.md.

    flock /tmp/quantkit-heavy.lock .venv/bin/python benchmarks/kernels.py
    .venv/bin/python benchmarks/kernels.py --skip-1b --rounds 1          # quick look
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import quantkit
from quantkit.api import quantize, resolve
from quantkit.errors import QuantkitError
from quantkit.formats.layouts import GPTQLayout
from quantkit.formats.qlinear import QuantLinear
from quantkit.grid import rtn_quantize
from quantkit.kernels import KERNELS, kernels_used, spec_of
from quantkit.kernels.cache import wait_for_writes

sys.path.insert(0, str(Path(__file__).parent))
import llamacpp  # noqa: E402  (beside this file: llama.cpp as a peer, when llama-cpp-python is installed)
from llamacpp import LlamaCpp  # noqa: E402

log = logging.getLogger("benchmarks.kernels")
RESULTS = Path(__file__).parent / "results" / "kernels.md"

LAYERS = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "1B": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)],
    "7B": [(4096, 4096), (11008, 4096), (4096, 11008)],
}
W4 = (4, 64, False)   # RTN w4g64 asym, the peers' protocol scheme
W4SYM = (4, 64, True)  # symmetric: what _dyn_quant_matmul_4bit takes
W8 = (8, -1, False)   # RTN w8 per channel
LOAD_REPEATS = 3  # load times: the fastest of this many
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True)


def timeit(fn: Callable[[], Any], budget: float, min_reps: int = 3) -> float:
    """Fastest time of `fn` over at least `min_reps` calls and about `budget` seconds (after one warm-up).

    The minimum, not the median: on this shared machine other jobs' time slices add 10-50 ms
    stalls to a share of the calls; the minimum is the kernel's own cost.
    """
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- 1. per layer --------------------------------------------------------------------------------
def layer_variants(out_f: int, in_f: int, with_reference: bool) -> dict[str, tuple[torch.nn.Module, torch.dtype]]:
    """Dense fp32/bf16 Linears and the quantized variants of one random (out, in) weight."""
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    dense32 = torch.nn.Linear(in_f, out_f, bias=False)
    dense32.weight.data = w
    dense16 = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    dense16.weight.data = w.bfloat16()
    out: dict[str, tuple[torch.nn.Module, torch.dtype]] = {"fp32": (dense32, torch.float32),
                                                            "bf16": (dense16, torch.bfloat16)}
    for label, (bits, group, sym), kernels in (("w4", W4, ("cpu-int4",)), ("w4sym", W4SYM, ("cpu-dyn4",)),
                                               ("w8", W8, ("cpu-int8",))):
        qw = rtn_quantize(w, bits, group, sym)
        if with_reference and label != "w4sym":
            out[f"{label} reference"] = (QuantLinear.from_quantized(qw, GPTQLayout()), torch.float32)
        for name in kernels:
            if KERNELS[name].check(spec_of(qw, "cpu", torch.float32)) is None:
                out[f"{label} {name}"] = (KERNELS[name](qw, GPTQLayout(), "cpu", torch.float32), torch.float32)
    return out


def bench_layers(budget: float) -> tuple[list[str], list[list[str]]]:
    rows: list[list[str]] = []
    header: list[str] = []
    for model, shapes in LAYERS.items():
        for out_f, in_f in shapes:
            variants = layer_variants(out_f, in_f, with_reference=model == "smollm2")
            header = header or list(variants)
            for batch in (1, 16):
                x = torch.randn(batch, in_f)
                cells = [model, f"{out_f}x{in_f}", str(batch)]
                base = None
                with torch.no_grad():
                    for name in header:
                        if name not in variants:
                            cells.append("-")
                            continue
                        mod, dtype = variants[name]
                        if "dyn4" in name and batch > 1 and out_f * in_f > 4_000_000:
                            cells.append("-")  # seconds per call: the reference loop without KleidiAI
                            continue
                        xd = x.to(dtype)
                        t = timeit(lambda: mod(xd), budget)
                        base = base or t
                        cells.append(f"{t * 1e6:.0f} ({base / t:.2f}x)")
                log.info("layer %s", " | ".join(cells))
                rows.append(cells)
            del variants
            gc.collect()
    return ["model", "shape (out x in)", "batch", *header], rows


# ---- 2. end to end -------------------------------------------------------------------------------
def decode_step_time(model: Any, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per generated token at batch 1 (greedy, KV cache), prefill excluded."""
    if isinstance(model, LlamaCpp):
        return model.decode_step_time(prompt, steps)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / steps


def prefill_time(model: Any, ids: torch.Tensor) -> float:
    if isinstance(model, LlamaCpp):
        return model.prefill_time(ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0


def timed_load(path: str | Path, **kw: Any) -> tuple[torch.nn.Module, float]:
    t0 = time.perf_counter()
    model = quantkit.load(path, **kw).eval()
    return model, time.perf_counter() - t0


def best_load(path: str | Path, repeats: int = 0, **kw: Any) -> tuple[torch.nn.Module, float]:
    """The fastest of `repeats` (default LOAD_REPEATS) loads, the machine being shared; the last model."""
    best, model = float("inf"), None
    for _ in range(repeats or LOAD_REPEATS):
        del model
        gc.collect()
        model, t = timed_load(path, **kw)
        best = min(best, t)
    return model, best


def check_ids(vocab: int, n: int = 64) -> torch.Tensor:
    """(1, n) the fixed random prompt every variant's logit error is measured on."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))


def logits_of(model: torch.nn.Module, n: int = 64) -> torch.Tensor:
    """(n, vocab) fp32 logits of the fixed random prompt."""
    ids = check_ids(model.config.vocab_size, n)
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0].float()


def rel_err(model: torch.nn.Module, exact: torch.Tensor) -> float:
    """||logits - exact|| / ||exact||: a correct kernel stays at its compute dtype's rounding (about 1e-2 in
    bf16); a wrong packing gives about 1. Printed next to every speed so no figure comes from a broken kernel."""
    return float((logits_of(model) - exact).norm() / exact.norm())


def e2e_variants(base: str | Path, w4: Path, w8: Path, reference: bool
                 ) -> tuple[dict[str, torch.nn.Module], dict[str, str], dict[str, float]]:
    models: dict[str, torch.nn.Module] = {}
    notes: dict[str, str] = {}
    errs: dict[str, float] = {}
    models["fp32"], _ = timed_load(base)
    exact = logits_of(models["fp32"])
    errs["fp32"] = 0.0
    models["bf16"], _ = timed_load(base, dtype=torch.bfloat16)
    errs["bf16"] = rel_err(models["bf16"], exact)
    for label, path in (("w4g64", w4), ("w8", w8)):
        ref, t_ref = best_load(path, kernel="reference")
        t0 = time.perf_counter()
        exact = logits_of(ref)  # the checkpoint's exact maths: the kernels must reproduce it
        f_ref = time.perf_counter() - t0  # first forward: the lazily mapped weights are read here
        if reference:
            models[f"{label} reference"] = ref
            errs[f"{label} reference"] = 0.0
        del ref
        for name, cls in KERNELS.items():
            if "cpu" not in cls.devices or cls.unavailable():
                continue
            try:  # what a first load costs: packing (its cache write runs in a background thread)
                model, t_pack = best_load(path, LOAD_REPEATS if cls.cacheable else 1, kernel=name, pack_cache=False)
            except QuantkitError:
                continue  # the kernel does not serve this scheme
            load_note = f"first load (packing) {t_pack:.2f} s vs reference {t_ref:.2f} s ({t_pack / t_ref:.2f}x)"
            t = t_pack
            if cls.cacheable:
                del model
                model, _ = timed_load(path, kernel=name)  # writes the packed-weight cache
                packed = logits_of(model)
                wait_for_writes()
                del model
                model, t = best_load(path, kernel=name)  # every later load: the packed weights from the cache
                load_note += f"; later loads (cache) {t:.2f} s ({t / t_ref:.2f}x)"
            t0 = time.perf_counter()
            errs[f"{label} {name}"] = rel_err(model, exact)
            f = time.perf_counter() - t0
            if cls.cacheable and not torch.equal(logits_of(model), packed):
                log.warning("%s %s: the cached load computes other logits than the packing load", label, name)
            models[f"{label} {name}"] = model
            notes[f"{label} {name}"] = f"{load_note}; load + first 64-token forward {t + f:.2f} s vs " + \
                f"{t_ref + f_ref:.2f} s ({(t + f) / (t_ref + f_ref):.2f}x); " + \
                ", ".join(f"{k} x{v}" for k, v in kernels_used(model).items())
        model, t = timed_load(path, kernel="auto", dtype=torch.bfloat16)
        models[f"{label} auto, bf16 model"] = model
        errs[f"{label} auto, bf16 model"] = rel_err(model, exact)
        notes[f"{label} auto, bf16 model"] = ", ".join(f"{k} x{v}" for k, v in kernels_used(model).items())
    for name, e in errs.items():
        if e > 0.1:
            log.warning("%s: logits differ from the exact maths by %.3g (relative): this kernel is wrong", name, e)
    return models, notes, errs


def bench_e2e(label: str, models: dict[str, Any], rounds: int, steps: int, prompt_len: int,
              prefill_len: int, vocab: int, errs: dict[str, float]) -> list[list[str]]:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    long = torch.randint(0, vocab, (1, prefill_len), generator=g)
    dec: dict[str, list[float]] = {k: [] for k in models}
    pre: dict[str, list[float]] = {k: [] for k in models}
    for name, m in models.items():  # warm-up
        decode_step_time(m, prompt, 2)
    for r in range(rounds):
        for name, m in models.items():  # round-robin: every variant sees the same machine load
            dec[name].append(decode_step_time(m, prompt, steps))
            pre[name].append(prefill_time(m, long))
            log.info("%s round %d %s: decode %.1f tok/s prefill %.1f tok/s", label, r, name,
                     1 / dec[name][-1], prefill_len / pre[name][-1])
    rows = []
    d32, p32 = min(dec["fp32"]), min(pre["fp32"])  # best round: the least disturbed by other jobs
    for name in models:
        d, p = min(dec[name]), min(pre[name])
        rows.append([label, name, f"{1 / d:.2f}", f"{d32 / d:.2f}x", f"{prefill_len / p:.1f}", f"{p32 / p:.2f}x",
                     f"{errs[name]:.1e}"])
    return rows


def peer_ratios(rows: list[list[str]]) -> list[str]:
    """quantkit's fastest w4 (w8) variant against llama.cpp Q4_0 (Q8_0), per model, from the e2e rows."""
    out = []
    for model in dict.fromkeys(r[0] for r in rows):
        dec = {r[1]: float(r[2]) for r in rows if r[0] == model}
        for ours, peer in (("w4g64", "llama.cpp Q4_0"), ("w8", "llama.cpp Q8_0")):
            mine = {k: v for k, v in dec.items() if k.startswith(ours + " ")}
            if peer in dec and mine:
                best = max(mine, key=mine.get)
                out.append(f"{model}: {best} {mine[best]:.2f} tok/s vs {peer} {dec[peer]:.2f} tok/s: "
                           f"{mine[best] / dec[peer]:.2f}x")
    return out


def make_1b(folder: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_1B, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)  # random init (std 0.02); bf16 halves disk and RAM
    n = sum(p.numel() for p in model.parameters())
    log.info("1B model: %.2f B parameters", n / 1e9)
    model.save_pretrained(folder)
    del model
    gc.collect()
    src = Path(resolve("smollm2-135m").path)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)  # any tokenizer: RTN needs none, the loader may
    return folder


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds per model (best taken)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on the shared 2-core box a 2-thread op waits for a descheduled thread)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round")
    ap.add_argument("--layer-budget", type=float, default=0.5, help="seconds per layer timing")
    ap.add_argument("--prefill", type=int, default=128, help="prefill length in tokens")
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true", help="leave out llama.cpp even when llama-cpp-python is installed")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_avg = os.getloadavg()[0]
    parts = [f"# Kernel benchmark\n\n`{' '.join(['flock /tmp/quantkit-heavy.lock .venv/bin/python', *sys.argv])}`\n",
             f"{started}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}; "
             f"1-min load average at start {load_avg:.1f} (shared machine: compare ratios within a table).\n"]
    if not args.skip_layers:
        header, rows = bench_layers(args.layer_budget)
        parts.append("## Per-layer matmul, microseconds (speed-up vs fp32)\n\n"
                     "Random weights; w4 = RTN w4g64 asym, w8 = RTN per-channel asym; fp32 activations "
                     "(the CPU kernels compute in bf16).\n\n" + table(header, rows) + "\n")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(parts))
    e2e_rows: list[list[str]] = []
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="qk-kernels-", dir="/tmp") as tmp:
        os.environ["QUANTKIT_PACK_CACHE_DIR"] = str(Path(tmp) / "packed")  # cold: every first load packs
        sources: list[tuple[str, str | Path, int]] = [("smollm2-135m", "smollm2-135m", 49152)]
        if not args.skip_1b:
            sources.append(("llama-1B (random)", make_1b(Path(tmp) / "llama1b"), LLAMA_1B["vocab_size"]))
        for label, src, vocab in sources:
            w4, w8 = Path(tmp) / f"{vocab}-w4g64", Path(tmp) / f"{vocab}-w8"
            quantize(src, "rtn", w4, scheme="w4g64", device="cpu")
            quantize(src, "rtn", w8, scheme="w8", device="cpu")
            models, n, errs = e2e_variants(src, w4, w8, reference=vocab != LLAMA_1B["vocab_size"])
            if llamacpp.available() and not args.no_llamacpp:
                ids = check_ids(vocab)
                lm, lerr, ln = llamacpp.variants(resolve(src).path, Path(tmp), args.threads, ids,
                                                 logits_of(models["fp32"]))
                models.update(lm)
                errs.update(lerr)
                n.update(ln)
            notes.update({f"{label}: {k}": v for k, v in n.items()})
            e2e_rows += bench_e2e(label, models, args.rounds, args.steps, prompt_len=32, prefill_len=args.prefill, vocab=vocab,
                                 errs=errs)
            del models
            gc.collect()
            ratios = peer_ratios(e2e_rows)
            parts_e2e = (f"## End to end (batch 1)\n\nDecode: tokens/s generating after a 32-token prompt "
                         f"with the KV cache; prefill: one {args.prefill}-token forward. Models loaded in fp32 unless "
                         "the row says bf16; best of round-robin rounds. `logit err`: ||logits - exact|| / ||exact|| on a "
                         "64-token prompt, exact = fp32 for the float rows, the reference module for the quantized "
                         "ones (a correct kernel stays near its compute dtype's rounding).\n\n"
                         + table(["model", "variant", "decode tok/s", "vs fp32", "prefill tok/s", "vs fp32",
                                  "logit err"], e2e_rows)
                         + ("\n\nquantkit against llama.cpp (decode tokens/s ratio, same threads, same run):\n\n"
                            + "\n".join(f"- {r}" for r in ratios) if ratios else "")
                         + "\n\nKernels and load times:\n\n" + "\n".join(f"- {k}: {v}" for k, v in notes.items()) + "\n")
            args.out.write_text("\n".join(parts + [parts_e2e]))
            shutil.rmtree(w4)
            shutil.rmtree(w8)
    log.info("wrote %s", args.out)
    sys.stdout.write(args.out.read_text())


if __name__ == "__main__":
    main()
