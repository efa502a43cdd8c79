"""Calibrating a quantized KV cache (`--kv-cache fp8`): per-layer key and value scales, measured where vLLM
quantizes them, on the model exactly as its checkpoint computes (quantized weights, quantized activations).

After the weight method has chosen every Linear's codes, the checkpoint's tensors (in the dtype they are
written in) are assembled into the model `quantkit.load` would return, the calibration windows run through it
with the attention hooked (`quantkit.models.kvcache`), and each layer's scale is max|x| / 448 over every
calibration token: keys after the rotary embedding, values as projected, before GQA repeats them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from quantkit.calib.data import calibration_samples
from quantkit.formats.loader import packed_model, skeleton
from quantkit.models.arch import architecture_name, find_arch, get_blocks
from quantkit.models.kvcache import KVCacheError, attention_modules, check_hookable, observing, scales_from

log = logging.getLogger(__name__)


def check_kv_job(impl: Any, job: Any, method: str) -> None:
    """Before anything loads: the run's format must carry a kv_cache_scheme, and the architecture's attention must
    be hookable (read from a meta-device skeleton of the source's config; nothing is allocated)."""
    from quantkit.scheme import PRESETS

    fmt = impl.output_format(job.scheme) if getattr(impl, "uses_scheme", True) else None
    if fmt != "compressed-tensors":
        ct = ", ".join(k for k, v in PRESETS.items() if v.get("input_activations"))
        where = f"the {fmt} format has no KV-cache scheme" if fmt else f"{method} writes its own fixed format"
        raise KVCacheError(f"--kv-cache fp8 is written as compressed-tensors' kv_cache_scheme, but {where}; "
                           f"use a compressed-tensors preset ({ct}) with --method rtn, gptq, smoothquant or "
                           f"smoothquant-rtn")
    if job.source.kind != "folder":
        return  # checked on the loaded model (a forward that misses a layer is refused)
    model = skeleton(Path(job.source.path), torch.float32, job.trust_remote_code)
    spec = find_arch(model)
    if spec is None:
        return  # the method refuses an unknown architecture in its own words
    check_hookable(attention_modules(model, get_blocks(model, spec)), architecture_name(model))


@torch.no_grad()
def calibrate_kv(artifact: Any, job: Any) -> dict[str, tuple[Tensor, Tensor]]:
    """(k_scale, v_scale) of every attention module of `artifact` (a PackedArtifact before it is saved)."""
    tensors = {e.name: e.load() for e in artifact.entries()}
    model = packed_model(artifact.model.config, tensors, artifact.quantization_config(), torch.float32,
                         job.trust_remote_code).to(job.device)
    del tensors
    spec = find_arch(model)
    if spec is None:
        raise KVCacheError(f"{architecture_name(model)}: quantkit has no block table for it; --kv-cache cannot apply")
    attn = attention_modules(model, get_blocks(model, spec))
    check_hookable(attn, architecture_name(model))
    c = job.calib
    samples = calibration_samples(artifact.tokenizer, c.dataset, c.nsamples, c.seqlen, c.seed, c.text_field)
    n = int(samples.shape[0])
    with observing(model, attn) as amax:
        for i, batch in enumerate(samples.split(c.batch_size)):
            model(input_ids=batch.to(job.device), use_cache=False)
            if job.progress is not None:
                job.progress("kv-cache scales", min((i + 1) * c.batch_size, n), n)
    scales = scales_from(amax, architecture_name(model))
    log.info("KV-cache scales of %d layers from %d calibration windows", len(scales), n)
    return scales
