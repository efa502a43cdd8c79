"""`--imatrix FILE`: llama.cpp's importance matrix from quantkit's calibration data and pipeline.

For every Linear of every decoder block, the sum over calibration tokens of x**2 per input
channel (x = the Linear's input; `quantkit.calib.sqsums`). Written in llama.cpp's
GGUF imatrix format, keyed by llama.cpp tensor names:
    general.type = "imatrix", imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size
    <name>.in_sum2  F32 (1, in)   sum of x**2        <name>.counts  F32 (1, 1)   tokens seen
llama-quantize divides in_sum2 by counts: the per-channel mean of x**2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, GGUFWriter, TensorNameMap
from torch import Tensor

from quantkit.calib.data import calibration_samples
from quantkit.calib.sqsums import channel_sq_sums, collect_imatrix  # noqa: F401 - channel_sq_sums: re-exported
from quantkit.convert.gguf_tensors import write_gguf
from quantkit.errors import OutputExistsError, QuantkitError
from quantkit.loading import load
from quantkit.models.sources import load_tokenizer, resolve
from quantkit.paths import atomic_file

log = logging.getLogger(__name__)


def imatrix_arrays(stats: dict[str, tuple[Tensor, int]], name_map: TensorNameMap) -> dict[str, np.ndarray]:
    """HF-named statistics -> llama.cpp-named float32 tensors (in_sum2 (1, in), counts (1, 1)), sorted."""
    out: dict[str, np.ndarray] = {}
    for hf_name in sorted(stats):
        gname = name_map.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise QuantkitError(f"{hf_name} has no llama.cpp tensor name; --imatrix supports the GGUF architectures")
        sq, n = stats[hf_name]
        out[f"{gname}.in_sum2"] = sq.to(torch.float32).numpy().reshape(1, -1)
        out[f"{gname}.counts"] = np.array([[float(n)]], dtype=np.float32)
    return out


def importance_from_stats(stats: dict[str, tuple[Tensor, int]], name_map: TensorNameMap) -> dict[str, np.ndarray]:
    """HF-named statistics -> {llama.cpp weight name: (in,) float32 mean x**2}: llama-quantize's quant_weights."""
    arrays = imatrix_arrays(stats, name_map)
    return {k[: -len(".in_sum2")]: (v.reshape(-1) / arrays[k[: -len(".in_sum2")] + ".counts"].reshape(())
                                    ).astype(np.float32)
            for k, v in arrays.items() if k.endswith(".in_sum2")}


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """A llama.cpp GGUF imatrix file (llama-imatrix's, or quantkit's --imatrix) -> {weight name: mean x**2}."""
    from gguf import GGUFReader

    try:
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(str(path)).tensors}
    except (OSError, ValueError) as e:
        raise QuantkitError(f"{path}: not a GGUF imatrix file ({e}); write one with --imatrix or llama-imatrix") from e
    out = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2") and name[: -len(".in_sum2")] + ".counts" in tensors:
            base = name[: -len(".in_sum2")]
            count = float(tensors[base + ".counts"].reshape(-1)[0])
            out[base] = (sums.reshape(-1) / max(count, 1.0)).astype(np.float32)
    if not out:
        raise QuantkitError(f"{path} holds no in_sum2/counts pairs: not a llama.cpp imatrix")
    return out


def compute_importance(src: str | Path, dataset: str = "wiki-vital", nsamples: int = 32, seqlen: int = 512,
                       seed: int = 0, device: torch.device | str = "cpu",
                       samples: Tensor | None = None) -> dict[str, np.ndarray]:
    """quantkit's own activation statistics of `src` as llama.cpp quant_weights, keyed by llama.cpp names."""
    from quantkit.convert.gguf_export import GGUF_ARCHS

    model = load(src, device="cpu")
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if arch not in GGUF_ARCHS:
        raise QuantkitError(f"calibrated GGUF export supports {', '.join(GGUF_ARCHS)}, not {arch}")
    if samples is None:
        samples = calibration_samples(load_tokenizer(resolve(src)), dataset, nsamples, seqlen, seed)
    stats = collect_imatrix(model, samples, device)
    return importance_from_stats(stats, TensorNameMap(GGUF_ARCHS[arch].arch, model.config.num_hidden_layers))


def write_imatrix(src: str | Path, path: Path, dataset: str = "wiki-vital", nsamples: int = 32, seqlen: int = 512,
                  seed: int = 0, device: torch.device | str = "cpu", force: bool = False) -> dict[str, Any]:
    """Compute the importance matrix of `src` on `dataset` and write it (atomically) at `path`."""
    from quantkit.convert.gguf_export import GGUF_ARCHS

    if path.exists() and not force:
        raise OutputExistsError(f"imatrix output {path} already exists; pass --force to overwrite it")
    model = load(src, device="cpu")
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if arch not in GGUF_ARCHS:
        raise QuantkitError(f"--imatrix supports {', '.join(GGUF_ARCHS)}, not {arch}")
    tok = load_tokenizer(resolve(src))
    samples = calibration_samples(tok, dataset, nsamples, seqlen, seed)
    stats = collect_imatrix(model, samples, device)
    gg_arch = GGUF_ARCHS[arch].arch
    arrays = imatrix_arrays(stats, TensorNameMap(gg_arch, model.config.num_hidden_layers))
    with atomic_file(path) as tmp:
        w = GGUFWriter(tmp, MODEL_ARCH_NAMES[gg_arch])
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", nsamples)
        w.add_uint32("imatrix.chunk_size", seqlen)
        for name, arr in arrays.items():
            w.add_tensor(name, arr)
        write_gguf(w)
    return {"path": str(path), "entries": len(arrays) // 2, "dataset": dataset, "chunks": nsamples, "chunk_size": seqlen}
