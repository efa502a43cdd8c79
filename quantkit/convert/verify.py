"""`--verify`: reload the output and compare its logits with the source's on a few windows of the built-in text."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from quantkit.calib.data import test_windows
from quantkit.errors import QuantkitError
from quantkit.loading import load
from quantkit.models.sources import load_tokenizer, resolve

log = logging.getLogger(__name__)


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """a, b: (n, T, vocab) logits of the source and the output. Max |delta|, mean KL(a || b), top-1 agreement."""
    a, b = a.double(), b.double()
    lpa, lpb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (lpa.exp() * (lpa - lpb)).sum(-1)
    return {
        "max_abs_logit": float((a - b).abs().max()),
        "kl": float(kl.mean()),
        "top1": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
    }


@torch.no_grad()
def _logits(model: torch.nn.Module, windows: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return torch.cat([model(input_ids=w[None].to(device), use_cache=False).logits.float().cpu() for w in windows])


def verify_conversion(src: str | Path, out: str | Path, exact: bool, windows: int = 4, seqlen: int = 128,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Compare `out` against `src`; raises when an exact conversion's logits differ at all."""
    tok = load_tokenizer(resolve(src))
    ids = test_windows(tok, seqlen=seqlen, max_windows=windows)
    ref = _logits(load(src, device=device), ids, device)
    got = _logits(load(out, device=device), ids, device)
    stats = {**compare_logits(ref, got), "windows": int(ids.shape[0]), "seqlen": seqlen, "exact_expected": exact}
    log.info("verify: max |dlogit| %.3g, KL %.3g, top-1 %.4f over %d windows",
             stats["max_abs_logit"], stats["kl"], stats["top1"], stats["windows"])
    if exact and stats["max_abs_logit"] != 0.0:
        raise QuantkitError(f"verify failed: the conversion should be exact but max |dlogit| is "
                            f"{stats['max_abs_logit']:.3g}; please report this with the source checkpoint")
    return stats
