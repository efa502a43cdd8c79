"""Evaluate checkpoints side by side against a base: quality, speed, memory, size.

Memory stays bounded by one model (two in the fallback below):
- the base is loaded alone and scored once; its log-probs for every scored token
  are streamed window by window to a disk spill (float16 + exact argmax, see
  quantkit.eval.cache) and never all kept in memory. The spill is cached by
  content hash, so re-running with more checkpoints skips the base entirely
  (it is reloaded only to measure its speed, which must come from the same run);
- then each checkpoint is loaded alone, scored window by window against the
  spill, timed, and freed before the next one;
- when the spill would exceed `cache_budget_gb` (big vocabularies x many
  tokens), nothing is spilled: the base stays loaded and its windows are
  recomputed beside each checkpoint (exact float32, two models resident).

Rows are plain dicts with every key of ROW_KEYS (the JSON schema, SCHEMA_VERSION);
a checkpoint that fails to load, runs out of memory or fails to run gets a row
with `error` set, and the other rows still complete. The base failing is fatal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantkit.calib.pipeline import Progress
from quantkit.errors import QuantkitError
from quantkit.eval import hardware, protocol
from quantkit.eval.compat import check_comparable
from quantkit.eval.cache import BaseCache, BaseEntry, Spill, base_key, content_digest, spill_bytes
from quantkit.eval.describe import describe, label
from quantkit.eval.memory import PeakMemory, model_bytes, release
from quantkit.eval.quality import Accumulator, KLWork, base_logprobs, score_window, scored_logits, token_nll
from quantkit.eval.speed import SpeedConfig, measure
from quantkit.loading import load, resolve_device
from quantkit.kernels import check_kernel_name, kernels_used
from quantkit.models.sources import load_tokenizer, resolve

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
ROW_KEYS = (
    "model", "label", "method", "format", "scheme", "size_bytes", "bits_per_weight", "bits_per_weight_all", "is_base", "cached", "error",
    "ppl", "nll", "tokens", "kl", "kl_p99", "top1", "delta_ppl_pct",
    "load_seconds", "load_peak_bytes", "weights_bytes", "eval_seconds", "eval_tokens_per_s", "eval_peak_bytes",
    "ttft_ms", "tps", "throughput_tps", "rel_speed", "gen_peak_bytes", "peak_bytes", "attn_implementation",
    "kernels", "scored_with", "kv_bytes_per_token", "context_bytes",
)
QUALITY_KEYS = ("ppl", "nll", "tokens", "kl", "kl_p99", "top1", "delta_ppl_pct", "eval_seconds", "eval_tokens_per_s",
                "eval_peak_bytes")
LOAD_KEYS = ("load_seconds", "load_peak_bytes", "weights_bytes", "attn_implementation")


def new_row(path: str, is_base: bool) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(model=path, label=label(path), is_base=is_base, cached=False)
    return row


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _reason(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _oom(exc):
        return f"out of memory: {first}"
    if isinstance(exc, QuantkitError):
        return first
    return f"{type(exc).__name__}: {first}"


class Run:
    """One `quantkit eval` run: the shared protocol, device, cache and base."""

    def __init__(self, ev: protocol.EvalData, device: torch.device, dtype: torch.dtype, speed: SpeedConfig | None,
                 store: BaseCache, progress: Progress | None, kernel: str = "reference"):
        self.ev, self.device, self.dtype, self.speed = ev, device, dtype, speed
        self.kernel = kernel  # serves the load, memory and speed figures; quality is scored on the exact maths
        self.store, self.progress = store, progress
        self.prompts = protocol.prompts(ev, speed.batch, speed.prompt_len) if speed else None
        self.spill: Spill | None = None
        self.base_model: nn.Module | None = None
        self.strategy: str | None = None
        self.cache_hit = False

    def tick(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    # ---- loading, timing, memory -------------------------------------------------
    def load(self, row: dict[str, Any], kernel: str = "reference") -> nn.Module:
        """Load row["model"]; memory is measured from here (the previous model was released after its row)."""
        with PeakMemory(self.device) as pm:
            t0 = time.perf_counter()
            model = load(row["model"], device=self.device, dtype=self.dtype, kernel=kernel).eval()
            row["kernels"] = kernels_used(model) or None
            row["load_seconds"] = round(time.perf_counter() - t0, 3)
        row["_baseline"] = pm.start_bytes
        row["load_peak_bytes"] = pm.peak_bytes
        row["weights_bytes"] = model_bytes(model)
        row["attn_implementation"] = hardware.prefer_flash_attention(model, self.device)
        return model

    def _above_baseline(self, row: dict[str, Any], pm: PeakMemory) -> int:
        return max(pm.peak_total - row.get("_baseline", pm.start_bytes), 0)

    def measure_speed(self, model: nn.Module, row: dict[str, Any]) -> None:
        assert self.speed is not None and self.prompts is not None
        self.tick(f"{row['label']} speed", 0, 1)
        with PeakMemory(self.device) as pm:
            res = measure(model, self.prompts, self.speed, self.device)
        row.update(ttft_ms=res.ttft_ms, tps=res.tps, throughput_tps=res.throughput_tps,
                   gen_peak_bytes=self._above_baseline(row, pm))
        self.tick(f"{row['label']} speed", 1, 1)

    # ---- quality ----------------------------------------------------------------
    def base_pass(self, model: nn.Module, row: dict[str, Any], key: str | None, budget: int) -> BaseEntry:
        """Score the base once; stream its log-probs to the spill when it fits the budget."""
        ev = self.ev
        sizes = [int(ev.windows.shape[1]) - f for f in ev.firsts]
        acc = Accumulator(with_base=False)
        work = KLWork()
        folder = self.store.new_folder()
        spill: Spill | None = None
        vocab = 0
        n = len(sizes)
        with PeakMemory(self.device) as pm:
            t0 = time.perf_counter()
            for i, (window, first) in enumerate(zip(ev.windows, ev.firsts)):
                logits = scored_logits(model, window, first, self.device)
                acc.add(token_nll(logits, window[first:], work)[0])
                if i == 0:
                    vocab = int(logits.shape[-1])
                    if spill_bytes(vocab, sizes) <= budget:
                        spill = Spill(folder, vocab, sizes, mode="w+")
                if spill is not None:
                    spill.write(i, base_logprobs(logits), logits.argmax(-1))
                self.tick(f"{row['label']} (base) windows", i + 1, n)
            seconds = time.perf_counter() - t0
        if spill is not None:
            spill.flush()
        q = acc.result()
        row.update(ppl=q.ppl, nll=q.nll, tokens=q.tokens, kl=0.0, kl_p99=0.0, top1=100.0, delta_ppl_pct=0.0,
                   eval_seconds=round(seconds, 3), eval_tokens_per_s=q.tokens / max(seconds, 1e-9),
                   eval_peak_bytes=self._above_baseline(row, pm))
        record = {"row": {k: row[k] for k in QUALITY_KEYS + LOAD_KEYS}, "vocab": vocab, "sizes": sizes, "spill": spill is not None}
        return self.store.commit(key, folder, record)

    def score(self, model: nn.Module, row: dict[str, Any], peak_key: str = "eval_peak_bytes") -> None:
        """ppl, and KL / top-1 against the base (spill or recomputed), window by window.

        `peak_key`: where the scoring pass's memory goes (not eval_peak_bytes when `model` is not the
        model the row's memory figures describe)."""
        ev = self.ev
        with_base = self.spill is not None or self.base_model is not None
        acc = Accumulator(with_base=with_base)
        n = int(ev.windows.shape[0])
        work = KLWork()
        with PeakMemory(self.device) as pm:
            t0 = time.perf_counter()
            for i, (window, first) in enumerate(zip(ev.windows, ev.firsts)):
                base_lp = top = None
                if self.spill is not None:
                    base_lp, top = self.spill.read(i)  # float16, renormalised inside kl_rows
                elif self.base_model is not None:
                    b_logits = scored_logits(self.base_model, window, first, self.device)
                    base_lp, top = base_logprobs(b_logits), b_logits.argmax(-1)
                    del b_logits
                score_window(model, window, first, self.device, acc, base_lp, top, work)
                self.tick(f"{row['label']} windows", i + 1, n)
            seconds = time.perf_counter() - t0
        q = acc.result()
        row.update(ppl=q.ppl, nll=q.nll, tokens=q.tokens, kl=q.kl, kl_p99=q.kl_p99, top1=q.top1,
                   eval_seconds=round(seconds, 3), eval_tokens_per_s=q.tokens / max(seconds, 1e-9))
        row[peak_key] = self._above_baseline(row, pm)

    def forward_peak(self, model: nn.Module, row: dict[str, Any]) -> None:
        """Peak memory of one scoring window on the served model (the memory column without --speed)."""
        window, first = self.ev.windows[0], self.ev.firsts[0]
        with PeakMemory(self.device) as pm:
            logits = scored_logits(model, window, first, self.device)
            del logits
        row["eval_peak_bytes"] = self._above_baseline(row, pm)

    def exact_model(self, row: dict[str, Any]) -> tuple[nn.Module, str]:
        """The row's checkpoint on the dense kernel (dequantized once at load, bit-identical to the reference
        module and about 4x faster to score); the reference module where dense cannot serve."""
        try:
            return load(row["model"], device=self.device, dtype=self.dtype, kernel="dense").eval(), "dense"
        except QuantkitError:
            return load(row["model"], device=self.device, dtype=self.dtype, kernel="reference").eval(), "reference"

    # ---- the two kinds of rows --------------------------------------------------
    def run_base(self, name: str, use_cache: bool, budget: int) -> dict[str, Any]:
        row = new_row(name, True)
        row.update(describe(name))
        key = None
        if use_cache:
            src = resolve(name)
            if src.kind in ("folder", "gguf"):
                key = base_key(content_digest(src.path, self.store.root), self.ev.digest(), self.dtype, self.device)
        entry = self.store.lookup(key)
        needs_model = entry is None or self.speed is not None or not entry.record.get("spill")
        model = self.load(row) if needs_model else None
        if entry is not None:
            self.cache_hit = True
            row["cached"] = True
            # a base reloaded in this run (for speed) keeps its fresh load figures
            keys = QUALITY_KEYS if model is not None else QUALITY_KEYS + LOAD_KEYS
            row.update({k: entry.record["row"].get(k) for k in keys})
        else:
            assert model is not None
            entry = self.base_pass(model, row, key, budget)
        if self.speed is not None and model is not None:
            self.measure_speed(model, row)
        self.spill = entry.spill()
        self.strategy = "disk-fp16" if self.spill is not None else "recompute"
        if self.spill is None:
            self.base_model = model  # kept resident: its windows are recomputed beside each checkpoint
        else:
            del model
            release(self.device)
        return row

    def run_path(self, name: str) -> dict[str, Any]:
        """Load, memory and speed on the served kernels (`self.kernel`); quality on the exact maths."""
        row = new_row(name, False)
        model = None
        try:
            row.update(describe(name))
            model = self.load(row, self.kernel)
            if "float-quantized" in str(row.get("format")) and not set(row["kernels"] or {}) - {"dense", "reference"}:
                row["method"] = f"{row['method']} (dequantized: no FP8 kernel here)"  # the table says how FP8 ran
            if self.speed is not None:
                self.measure_speed(model, row)
            if set(row["kernels"] or {}) - {"reference", "dense"}:  # a fast kernel rounds differently
                if self.speed is None:
                    self.forward_peak(model, row)
                model = None
                release(self.device)
                model, row["scored_with"] = self.exact_model(row)
                self.score(model, row, peak_key="_score_peak")
            else:  # already exact: the reference module, dense, or no quantized Linear (bnb, GGUF, HF)
                row["scored_with"] = ",".join(sorted(row["kernels"])) if row["kernels"] else "model"
                self.score(model, row)
        except Exception as exc:  # noqa: BLE001 - one row records why; the other rows still complete
            log.info("%s failed: %s", name, _reason(exc))  # the row carries it; the CLI prints one line
            log.debug("traceback", exc_info=True)
            row["error"] = _reason(exc)
        finally:
            del model
            release(self.device)
        return row


def _finish(rows: list[dict[str, Any]], context: int | None) -> None:
    base = next((r for r in rows if r["is_base"] and r.get("ppl")), None)
    for r in rows:
        weights = r.pop("_tensor_bytes", None)
        if context is not None and weights is not None and r.get("kv_bytes_per_token") is not None:
            r["context_bytes"] = weights + r["kv_bytes_per_token"] * context  # the article's memory: weights + cache
        r.pop("_baseline", None)
        r.pop("_score_peak", None)
        peaks = [r[k] for k in ("load_peak_bytes", "gen_peak_bytes" if r.get("gen_peak_bytes") is not None
                                else "eval_peak_bytes") if r.get(k) is not None]
        r["peak_bytes"] = max(peaks) if peaks else None
        if base is None or r.get("error"):
            continue
        if r.get("ppl") is not None and not r["is_base"]:
            r["delta_ppl_pct"] = 100.0 * (r["ppl"] / base["ppl"] - 1.0)
        if r.get("tps") and base.get("tps"):
            r["rel_speed"] = r["tps"] / base["tps"]


def evaluate_paths(paths: list[str], base: str | None = None, dataset: str = "wiki-vital", seqlen: int | None = 512,
                   max_windows: int | None = 40, device: torch.device | str = "cpu", text_field: str = "text",
                   progress: Progress | None = None, *, stride: int | None = None, split: str = "auto",
                   dtype: str | None = None, speed: SpeedConfig | None = None, cache: bool = True,
                   cache_budget_gb: float = 8.0, cache_root: Any = None, kernel: str = "auto",
                   on_row: Callable[[dict[str, Any]], None] | None = None, context: int | None = None) -> dict[str, Any]:
    """Score `paths` (and `base`, marked and first) on the same windows; KL and top-1 against the base.

    seqlen None -> 2048 on CUDA, 512 on CPU; dtype None -> float16 on CUDA, float32 on CPU;
    max_windows None -> every window; speed None -> no speed measurement. `kernel` serves the
    quantized Linears in the speed pass ("auto": fastest per layer); quality uses the reference maths.
    `progress("checkpoints", i, n)` before each row (then its own stages); `on_row(row)` as each row is done
    (before Δppl and relative speed, which need every row). `context` (tokens): each row's `context_bytes` is its
    stored weights plus `kv_bytes_per_token` x context (KV-cache bytes per token: layers x KV heads x head dim x 2 x
    1 byte for an FP8 cache, 2 otherwise).
    """
    if context is not None and context < 1:
        raise QuantkitError(f"--context {context}: give the context length in tokens (1 or more)")
    if not paths and base is None:
        raise QuantkitError("nothing to evaluate: give at least one model path (and optionally --base)")
    check_comparable(paths, base)  # a missing path or an incomparable base: one line, before anything loads
    dev = resolve_device(device)
    torch_dtype = hardware.resolve_dtype(dtype, dev)
    seqlen = seqlen or hardware.default_seqlen(dev)
    if speed is not None:
        speed.check()
    ev = protocol.build(load_tokenizer(resolve(base if base is not None else paths[0])), dataset, seqlen, stride,
                        max_windows, text_field, split)
    store = BaseCache(cache_root, int(cache_budget_gb * (1 << 30)), persist=cache)
    check_kernel_name(kernel)
    run = Run(ev, dev, torch_dtype, speed, store, progress, kernel)
    rows: list[dict[str, Any]] = []
    n_rows = len(paths) + (base is not None)
    try:
        if base is not None:
            run.tick("checkpoints", 0, n_rows)
            rows.append(run.run_base(base, cache, int(cache_budget_gb * (1 << 30))))
            if on_row:
                on_row(rows[-1])
        for path in paths:
            run.tick("checkpoints", len(rows), n_rows)
            rows.append(run.run_path(path))
            if on_row:
                on_row(rows[-1])
        run.tick("checkpoints", n_rows, n_rows)
    finally:
        run.spill = None
        run.base_model = None
        store.close()
        release(dev)
    _finish(rows, context)
    proto = {**ev.describe(), "device": str(dev), "device_name": hardware.device_name(dev),
             "dtype": str(torch_dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "context": context, "base_logprobs": run.strategy, "base_cached": run.cache_hit,
             "speed": None if speed is None else {**speed.__dict__, "timer": "cuda events" if dev.type == "cuda"
                                                  else "perf_counter", "statistic": "median"}}
    return {"schema_version": SCHEMA_VERSION, "protocol": proto, "rows": rows}
