"""bitsandbytes checkpoints (quant_method "bitsandbytes"): what they store and how they reload.

transformers writes them with `save_pretrained` and reads them back with
`from_pretrained`; bitsandbytes >= 0.45 runs both 4-bit and LLM.int8 layers on
CPU as well as CUDA, so quantkit reloads them through transformers unchanged.

Tensors per quantized Linear `X`:
  4-bit (nf4/fp4): X.weight (packed codes, 2 per byte of quant_storage), X.weight.absmax,
                   X.weight.quant_map, X.weight.quant_state.bitsandbytes__<type> (JSON blob),
                   with double quant also X.weight.nested_absmax and X.weight.nested_quant_map.
  int8:            X.weight (int8, out x in), X.SCB (fp32 row scales, (out,)), X.weight_format.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from quantkit.errors import CheckpointError, QuantkitError

log = logging.getLogger(__name__)

QUANT_METHOD = "bitsandbytes"
QUANT_STATE = ".weight.quant_state.bitsandbytes__"


def require_bitsandbytes() -> None:
    """Fail with one line when bitsandbytes is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantkitError("bitsandbytes is not installed; install it with: pip install 'quantkit[bnb]'")


def is_bnb_module(module: nn.Module) -> bool:
    """A bitsandbytes Linear (4-bit or int8) whose weight transformers serialises specially."""
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def unquantized_params(model: nn.Module) -> Iterator[nn.Parameter]:
    """Floating parameters outside bitsandbytes' packed weights (embeddings, norms, skipped Linears, biases)."""
    packed = {id(m.weight) for m in model.modules() if is_bnb_module(m)}
    for p in model.parameters():  # parameters() yields tied tensors once
        if id(p) not in packed and p.is_floating_point():
            yield p


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the non-quantized parameters to `dtype` in place (packed weights keep their storage dtype)."""
    for p in unquantized_params(model):
        p.data = p.data.to(dtype)


def quant_state_info(blob: Tensor) -> dict:
    """The JSON dict bitsandbytes packs into a uint8 tensor (quant_type, blocksize, shape, dtype, ...)."""
    try:
        return json.loads(bytes(blob.cpu().numpy().tobytes()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable bitsandbytes quant_state blob: {e}") from None


def load_bnb(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             trust_remote_code: bool = False) -> nn.Module:
    """Reload a bitsandbytes checkpoint for inference: non-quantized parameters in `dtype`.

    The 4-bit layers multiply in the checkpoint's `bnb_4bit_compute_dtype`; int8 layers as LLM.int8 does.
    """
    from transformers import AutoModelForCausalLM

    require_bitsandbytes()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map={"": str(torch.device(device))}, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load bitsandbytes checkpoint {folder}: {str(e).splitlines()[0]}") from None
    # transformers 5.x keeps a pre-quantized checkpoint's float tensors in their stored dtype whatever
    # `dtype` says; cast them so `dtype` means what it means for every other quantkit checkpoint.
    cast_unquantized(model, dtype)
    return model.eval()
