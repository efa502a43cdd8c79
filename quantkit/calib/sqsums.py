"""Per-input-channel second moments of every decoder-block Linear's input: the statistics llama.cpp's
importance matrix holds (`quantkit.convert.imatrix`) and the diagonal of each Linear's Hessian that the
bit allocator (`quantkit.budget`) weighs quantization error by.

For every Linear of every decoder block, the sum over calibration tokens of x**2 per input channel
(x = the Linear's input), collected block by block with `run_sequential` (the pipeline GPTQ and AWQ
calibrate with; the blocks are left unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantkit.calib.hooks import HookSet
from quantkit.calib.pipeline import BlockCalib, run_sequential
from quantkit.models.arch import get_arch


def channel_sq_sums(x: Tensor) -> tuple[Tensor, int]:
    """(..., in) activations -> ((in,) float64 sum of x**2 over all tokens, token count)."""
    flat = x.reshape(-1, x.shape[-1]).double()
    return (flat * flat).sum(0), flat.shape[0]


@torch.no_grad()
def collect_imatrix(model: torch.nn.Module, samples: Tensor, device: torch.device | str = "cpu",
                    batch_size: int = 8) -> dict[str, tuple[Tensor, int]]:
    """{full Linear name: (sum of x**2 per input channel, tokens)} over `samples` (n, T)."""
    spec = get_arch(model)

    def per_block(calib: BlockCalib) -> dict[str, Any]:
        sums: dict[str, list[Any]] = {}
        mods = {}
        for name in spec.linears:
            try:
                mods[name] = calib.block.get_submodule(name)
            except AttributeError:
                continue

        def record(name: str, x: Tensor) -> None:
            s, n = channel_sq_sums(x)
            acc = sums.setdefault(name, [torch.zeros_like(s), 0])
            acc[0] += s
            acc[1] += n

        def install(hs: HookSet) -> None:
            for name, mod in mods.items():
                hs.inputs(mod, record, name)

        calib.next_inputs = calib.forward(hooks=install, keep_outputs=True)  # one pass: stats and next inputs
        return {k: (v[0].cpu(), v[1]) for k, v in sums.items()}

    return run_sequential(model, spec, samples, per_block, device=torch.device(device), batch_size=batch_size)
