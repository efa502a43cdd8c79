"""Block-by-block (sequential) calibration, shared by every calibrated method.

1. Capture the inputs of the first decoder block with a kwargs pre-hook that
   stops the forward early (only the embeddings run).
2. For each block: put it on the compute device, let the method calibrate and
   quantize it (`BlockCalib` runs the block with hooks as often as the method
   needs), re-run the quantized block, and feed its outputs to the next block.

Only the current block sits on the compute device; activations live on
`store_device` (CPU by default). Memory is one block plus the activations.

With a `BlockStore` (the run's work folder, `quantkit.calib.workdir`) each finished
block's results go to disk instead of the returned dict, and a run that was killed
continues after its last finished block.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from quantkit.calib.heap import release_heap, steady_heap
from quantkit.calib.hooks import HookSet
from quantkit.calib.masters import computing_in, edit_originals
from quantkit.compute import map_tensors
from quantkit.models.arch import ArchSpec, get_blocks

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class StopForward(Exception):
    """Raise from a hook to end the current forward early: `BlockCalib.forward` moves on to the next batch.

    Methods that only need the inputs of the block's first Linears (GPTQ's true-sequential
    groups) stop there instead of paying for the rest of the block.
    """



@dataclass
class BlockInputs:
    hidden: list[Tensor]                         # per batch: (B, T, hidden)
    args: tuple = ()                             # extra positional args after hidden_states
    kwargs: dict[str, Any] = field(default_factory=dict)  # shared by every batch (same shapes, no padding)
    per_layer: list[dict[str, Any]] | None = None  # kwargs per block, for archs whose blocks differ
    reference: list[Tensor] | None = None        # the float model's inputs to the block (run_sequential(reference=True))

    def kwargs_for(self, i: int) -> dict[str, Any]:
        return self.per_layer[i] if self.per_layer is not None else self.kwargs


class BlockSource(Protocol):
    """Hands out decoder blocks one at a time (in memory, or lazily from disk)."""

    def __len__(self) -> int: ...
    def load(self, i: int, device: torch.device) -> nn.Module: ...
    def release(self, i: int, block: nn.Module) -> None: ...


class BlockStore(Protocol):
    """Where finished blocks go (`quantkit.calib.workdir.BlockStore`): resume point in, results out."""

    def resume(self, n_blocks: int, samples: Tensor) -> tuple[int, list[Tensor] | None, dict[str, Any]]: ...
    def finished(self, i: int, block: nn.Module, results: dict[str, Any], next_inputs: list[Tensor] | None,
                 last: bool, reference: list[Tensor] | None = None) -> dict[str, Any]: ...
    def saved_reference(self, i: int) -> list[Tensor] | None: ...


class InMemoryBlocks:
    """The model's own blocks: moved to the device for their turn, back to CPU after."""

    def __init__(self, blocks: nn.ModuleList, home: torch.device | str = "cpu"):
        self.blocks, self.home = blocks, home

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, i: int, device: torch.device) -> nn.Module:
        return self.blocks[i].to(device)

    def release(self, i: int, block: nn.Module) -> None:
        block.to(self.home)


def _to(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """`obj` (tensors, possibly nested in tuples, lists, dicts) on `device`; floating tensors cast to `dtype`."""
    return map_tensors(obj, lambda t: t.to(device, dtype) if dtype is not None and t.is_floating_point()
                       else t.to(device))


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def place_outside_blocks(model: nn.Module, spec: ArchSpec, device: torch.device | str) -> None:
    """Move everything but the decoder blocks (embeddings, rotary, final norm, head) to `device`."""

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == spec.blocks:
                continue
            if spec.blocks.startswith(full + "."):
                walk(child, full + ".")
            else:
                child.to(device)
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)

    walk(model, "")


@torch.no_grad()
def capture_inputs(model: nn.Module, spec: ArchSpec, samples: Tensor, batch_size: int,
                   device: torch.device, store_device: torch.device | str = "cpu") -> BlockInputs:
    """Run the model up to its first block for each batch of `samples` (n, T); record the block's inputs."""
    blocks = get_blocks(model, spec)
    captured = BlockInputs(hidden=[])

    def grab(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach().to(store_device))
        if not captured.kwargs:
            captured.args = _to(tuple(args[1:]), store_device)
            captured.kwargs = _to({k: v for k, v in kwargs.items() if k != "hidden_states"}, store_device)
        raise StopForward

    with HookSet() as hooks:
        hooks.pre(blocks[0], grab, with_kwargs=True)
        for batch in samples.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    if spec.per_layer_kwargs:
        captured.per_layer = _capture_per_layer_kwargs(model, blocks, samples[:batch_size], device, store_device)
    return captured


def _capture_per_layer_kwargs(model, blocks, batch, device, store_device) -> list[dict[str, Any]]:
    """One forward of one batch in which every block only records its kwargs (sliding/global masks and ropes)
    and hands its input on unchanged: the model builds those kwargs before its first block, from the batch's
    shape and positions, so no block needs computing (on Gemma 3 270M the blocks' real forward of a batch was 10.7
    of a smoothquant run's ~100 CPU s). It stops at the last block's input: the head's logits of a whole batch
    (8 x 512 tokens x Gemma 3's 262k vocabulary in float32: 4.3 GB) are never computed either."""
    per_layer: list[dict[str, Any]] = [{} for _ in blocks]

    def recorder(i):
        def rec(_mod, args, kwargs):
            per_layer[i] = _to({k: v for k, v in kwargs.items() if k != "hidden_states"}, store_device)
            if i == len(blocks) - 1:
                raise StopForward
        return rec

    def passing_on(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    with HookSet() as hooks:
        for i, b in enumerate(blocks):
            hooks.pre(b, recorder(i), with_kwargs=True)
            b.forward = passing_on  # the instance attribute shadows the class's forward (removed below)
        try:
            model(input_ids=batch.to(device), use_cache=False)
        except StopForward:
            pass
        finally:
            for b in blocks:
                del b.forward
    return per_layer


class BlockCalib:
    """One block and its calibration inputs, for a method to run as often as it needs.

    With a compute dtype (`run_sequential(compute_dtype=...)`) the block runs in that dtype and
    `master(linear)` gives the Linear's weight as it was loaded, in float32: what quantization reads.
    """

    def __init__(self, index: int, block: nn.Module, inputs: BlockInputs, device: torch.device,
                 dtype: torch.dtype | None = None, masters: dict[nn.Module, Tensor] | None = None,
                 autocast: torch.dtype | None = None, originals: dict[str, Tensor] | None = None):
        self.index, self.block, self.device, self.dtype = index, block, device, dtype
        self.autocast = autocast  # the block's own passes (reference, outputs) run under this autocast dtype
        self._inputs = inputs
        self._masters = masters if masters is not None else {}
        self._originals = originals if originals is not None else {}  # `computing_in`'s kept tensors, by name
        self._args = _to(inputs.args, device, dtype)
        self._kwargs = _to(inputs.kwargs_for(index), device, dtype)
        # A method that already ran the block and wants the next block calibrated on those outputs
        # (AWQ: float propagation, as AutoAWQ does) sets this; the pipeline then skips its own pass.
        self.next_inputs: list[Tensor] | None = None
        self.batch = 0  # index of the batch a pass is running (set by `forward` and by replays)
        # With run_sequential(reference=True): the float model's inputs to this block and the float block's
        # outputs on them (computed before the method runs), what a method tunes the quantized block towards.
        self.reference_inputs: list[Tensor] | None = inputs.reference
        self.reference_outputs: list[Tensor] | None = None

    @property
    def store_device(self) -> torch.device:
        """Where this run keeps activations between passes (the hidden states' device)."""
        return self._inputs.hidden[0].device

    @property
    def n_batches(self) -> int:
        return len(self._inputs.hidden)

    def batches(self) -> Iterator[Tensor]:
        for h in self._inputs.hidden:
            yield h.to(self.device, self.dtype)

    @property
    def args(self) -> tuple:
        return self._args

    def inputs(self) -> list[Tensor]:
        """The quantized model's inputs to this block, per batch, on the store device."""
        return self._inputs.hidden

    @torch.no_grad()
    def run_reference(self) -> None:
        """The float block's outputs on the float model's inputs (before any Linear is quantized)."""
        if self.reference_inputs is None:
            return
        outs = []
        with self._autocast():
            for h in self.reference_inputs:
                out = _first(self.block(h.to(self.device, self.dtype), *self._args, **self._kwargs))
                outs.append(out.detach().to(self.store_device))
        self.reference_outputs = outs

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()

    def master(self, linear: nn.Module) -> Tensor:
        """The (out, in) weight to quantize: the float32 original when the block computes in a lower dtype."""
        return self._masters.get(linear, linear.weight.detach())

    def edit_float(self, edit: Callable[[nn.Module], None]) -> None:
        """Apply `edit(block)`, which replaces parameter tensors (`p.data = ...`, e.g. a scale folded into a
        norm and the Linears after it), to the block's float originals, exactly, and hand the results to the
        computing block in its dtype (`quantkit.calib.masters.edit_originals`). Without a compute dtype it is
        `edit(block)`."""
        edit_originals(self.block, self._originals, self._masters, edit)

    @property
    def block_kwargs(self) -> dict[str, Any]:
        return self._kwargs

    @torch.no_grad()
    def forward(self, hooks: Callable[[HookSet], None] | None = None, keep_outputs: bool = False) -> list[Tensor]:
        """Run the block on every batch; `hooks(hs)` installs hooks for this pass only.

        A hook may raise `StopForward` to skip the rest of the block for that batch
        (then no output is kept for it).
        """
        outs: list[Tensor] = []
        with HookSet() as hs, self._autocast():
            if hooks is not None:
                hooks(hs)
            for i, h in enumerate(self.batches()):
                self.batch = i
                try:
                    out = _first(self.block(h, *self._args, **self._kwargs))
                except StopForward:
                    continue  # a hook stopped this batch early: there is no output to keep
                if keep_outputs:
                    outs.append(out.detach().to(self._inputs.hidden[0].device))
        return outs


BlockFn = Callable[[BlockCalib], dict[str, Any]]


def _test_hook_kill(i: int) -> None:
    """TEST HOOK (tests/unit/test_resume.py), inert unless QUANTKIT_TEST_KILL_AT_BLOCK is set: SIGKILL this
    process in the middle of block k (quantized, results not stored yet), as an OOM killer would."""
    at = os.environ.get("QUANTKIT_TEST_KILL_AT_BLOCK")
    if at is not None and int(at) == i:
        os.kill(os.getpid(), signal.SIGKILL)


def _test_hook_interrupt(i: int) -> None:
    """TEST HOOK (tests/faults/test_signals.py), inert unless QUANTKIT_TEST_SIGINT_AFTER_BLOCK is set: send this
    process SIGINT once block k is stored, as a user's Ctrl-C would (deterministic, where a timed signal races)."""
    at = os.environ.get("QUANTKIT_TEST_SIGINT_AFTER_BLOCK")
    if at is not None and int(at) == i:
        os.kill(os.getpid(), signal.SIGINT)


def _saved_reference(store: BlockStore, start: int, store_device: torch.device | str) -> list[Tensor]:
    saved = store.saved_reference(start)
    if saved is None:
        raise RuntimeError("the work folder holds no float reference stream for this block; pass --no-resume")
    return [h.to(store_device) for h in saved]


@torch.no_grad()
def run_sequential(model: nn.Module, spec: ArchSpec, samples: Tensor, quantize_block: BlockFn, *,
                   device: torch.device, batch_size: int = 8, store_device: torch.device | str = "cpu",
                   blocks: BlockSource | None = None, progress: Progress | None = None,
                   store: BlockStore | None = None, compute_dtype: torch.dtype | None = None,
                   reference: bool = False, autocast: torch.dtype | None = None,
                   final: Callable[[list[Tensor]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Calibrate and quantize the model block by block. Returns {full module name: method result}.

    `quantize_block(calib)` must leave the block computing with its quantized weights
    (the next block is calibrated on the quantized block's outputs) and return its results
    keyed by module name relative to the block. With a `store`, the blocks it already holds
    are skipped and each finished block is handed to it: the returned dict then keeps only
    what the store gives back (QuantizedWeight results live on disk).
    `compute_dtype` (e.g. bfloat16): each block computes in it while calibrated (activations too,
    passed on in it); quantization reads float32 masters and every block is restored after.
    `reference`: also carry the float model's hidden states from block to block; each `BlockCalib` then
    holds the float block's inputs and outputs (`reference_inputs`, `reference_outputs`), computed before
    the method runs, and the store keeps them for a resume.
    `autocast`: the pipeline's own passes through each block (float reference, outputs for the next block) run
    under autocast to this dtype (a method that tunes under autocast: the stream it sees is the one it tuned on).
    `final(hidden)`: called once after the last block with its outputs (per batch, on `store_device`: the
    quantized model's last hidden states, before the final norm); its results join the returned dict.
    Not with a `store` (a resumed run does not keep the last block's outputs).
    """
    if final is not None and store is not None:
        raise ValueError("run_sequential: `final` does not go with a resumable `store`")
    steady_heap()
    source = blocks or InMemoryBlocks(get_blocks(model, spec))
    place_outside_blocks(model, spec, device)
    inputs = capture_inputs(model, spec, samples, batch_size, device, store_device)
    if reference:
        inputs.reference = [h.clone() for h in inputs.hidden]
    results: dict[str, Any] = {}
    n, start = len(source), 0
    if store is not None:
        start, saved, kept = store.resume(n, samples)
        results.update(kept)
        if saved is not None:
            inputs.hidden = [h.to(store_device) for h in saved]
            if reference:
                inputs.reference = _saved_reference(store, start, store_device)
        if start and progress:
            progress("blocks", start, n)
    for i in range(start, n):
        block = source.load(i, device)
        last = i == n - 1
        originals: dict[str, Tensor] = {}
        with computing_in(block, compute_dtype, originals) as masters:
            calib = BlockCalib(i, block, inputs, device, compute_dtype, masters, autocast, originals)
            if reference:
                calib.run_reference()
            done = {f"{spec.blocks}.{i}.{name}": res for name, res in quantize_block(calib).items()}
            _test_hook_kill(i)
            if calib.next_inputs is not None:
                inputs.hidden = calib.next_inputs
            elif not last or final is not None:  # the last block's outputs: only `final` reads them
                inputs.hidden = calib.forward(keep_outputs=True)
        if reference:
            inputs.reference = calib.reference_outputs
        if store is None:
            results.update(done)
        elif reference:
            results.update(store.finished(i, block, done, inputs.hidden, last, reference=inputs.reference))
        else:
            results.update(store.finished(i, block, done, inputs.hidden, last))
        _test_hook_interrupt(i)
        source.release(i, block)
        del block, calib, done
        release_heap()
        if progress:
            progress("blocks", i + 1, n)
    if final is not None:
        results.update(final(inputs.hidden))
    return results
