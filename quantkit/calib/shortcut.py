"""Stand-ins for submodules whose output is their last Linear applied to that Linear's input.

True-sequential calibration reruns a block up to each group of Linears. Once a submodule's
last Linear is quantized (attention's o_proj, the MLP's down_proj), the submodule's output for
a batch is that Linear applied to the input it was seen with: recording those inputs lets later
passes (the next group's, and the pass that makes the next block's inputs) replace the whole
submodule by one matmul instead of recomputing it. A Linear qualifies when its recorded inputs cost
at most the two float32 hidden-wide copies the pipeline already keeps (a block's inputs and outputs):
attention's o_proj always; the MLP's down_proj when activations are 2-byte (bf16/fp16 calibration:
1536 x 2 B <= 2 x 576 x 4 B per token on smollm2), which saves recomputing gate/up twice per block.

Nothing is assumed about the architecture: the stand-in is used only after a check on the
first batch that the submodule's real output (its first element) equals, bit for bit, the
Linear applied to the recorded input. Otherwise the block runs as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn, no_grad

from quantkit.calib.hooks import HookSet
from quantkit.calib.pipeline import BlockCalib, StopForward

F32 = 4


def recording_affordable(in_features: int, out_features: int, itemsize: int) -> bool:
    """Whether a Linear's inputs may be recorded (tokens x in_features x itemsize): at most two float32
    copies of its output width, what the pipeline keeps anyway (down_proj's float32 inputs would add 0.2 GB
    at 64 x 512 on smollm2 and 1.4 GB at 7B). Used here and by the memory plans of the methods using it."""
    return in_features * itemsize <= 2 * out_features * F32


class Shortcut:
    """Record a Linear's inputs per batch; stand in for its parent module once the check passed."""

    def __init__(self, parent: nn.Module, linear: nn.Linear, calib: BlockCalib):
        self.parent, self.linear, self.calib = parent, linear, calib
        self.inputs: list[Tensor] = []     # per batch: the Linear's input, on the store device
        self.rest: tuple | None = None     # the parent's output after its first element (None: a bare tensor)
        self.valid = False
        self.checked = False

    @classmethod
    def find(cls, calib: BlockCalib, names: tuple[str, ...]) -> "Shortcut | None":
        """The shortcut for a group of one Linear inside a submodule of the block (else None)."""
        if len(names) != 1 or "." not in names[0]:
            return None
        parent_name = names[0].rsplit(".", 1)[0]
        linear = calib.block.get_submodule(names[0])
        if not cls.affordable(linear, calib.dtype or linear.weight.dtype):
            return None
        return cls(calib.block.get_submodule(parent_name), linear, calib)

    @staticmethod
    def affordable(linear: nn.Linear, dtype: torch.dtype) -> bool:
        """Whether recording this Linear's inputs in `dtype` fits the memory rule the plan counts."""
        return recording_affordable(linear.in_features, linear.out_features, dtype.itemsize)

    # ---- while the Linear's group is calibrated --------------------------------------
    def record(self, x: Tensor) -> None:
        """The Linear's input for the next batch (called from the group's pre-hook)."""
        self.inputs.append(x.detach().to(self.calib.store_device))

    def install_check(self, hs: HookSet) -> None:
        """On the first batch, compare the parent's output with the Linear on the recorded input
        (weights not quantized yet, so both are the same computation), then stop that batch."""
        def after(_mod: nn.Module, _args: Any, out: Any) -> None:
            if not self.checked:
                self.checked = True
                first = out[0] if isinstance(out, (tuple, list)) else out
                mine = self._apply(self.inputs[0].to(first.device))
                self.valid = isinstance(first, Tensor) and first.equal(mine)
                if isinstance(out, (tuple, list)):
                    self.rest = tuple(out[1:])
                    self.valid = self.valid and all(not isinstance(r, Tensor) for r in self.rest)
            raise StopForward
        hs.forward(self.parent, after)

    def _apply(self, x: Tensor) -> Tensor:
        """The Linear's maths without calling the module: its own hooks (the group's Hessian) must not see this."""
        with no_grad():
            return F.linear(x, self.linear.weight, self.linear.bias)

    # ---- in later passes --------------------------------------------------------------
    @contextmanager
    def standing_in(self) -> Iterator[None]:
        """The parent's forward replaced by the (quantized) Linear on the current batch's recorded input
        (`calib.batch`, set by every pass over the batches)."""
        device = next(self.linear.parameters()).device

        def forward(*_args: Any, **_kwargs: Any) -> Any:
            y = self._apply(self.inputs[self.calib.batch].to(device))
            return y if self.rest is None else (y, *self.rest)

        self.parent.forward = forward  # the instance attribute shadows the class's forward
        try:
            yield
        finally:
            del self.parent.forward
