"""Reading checkpoints: weight files, tensors, and packed weight-only checkpoints rebuilt as models.

Packed weight-only checkpoints (GPTQ, ...) are rebuilt with quantkit's own
pure-PyTorch QuantLinear: no gptqmodel, auto-gptq or CUDA needed. Every tensor
shape is checked against the architecture before anything is assigned.
`quantkit.load` (quantkit/loading.py) puts the kernels on top.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.errors import CheckpointError
from quantkit.integrity import PICKLE_SUFFIXES, pickle_refusal
from quantkit.formats.compressed_tensors import CTLayout, embedding_grid
from quantkit.formats.dynamic import read_dynamic
from quantkit.formats.qlinear import QuantLinear
from quantkit.formats.safetensors_io import load
from quantkit.formats.specs import detect_format
from quantkit.models.arch import find_arch, get_blocks
from quantkit.models.kvcache import K_SCALE, V_SCALE, KVCacheError, attach, attention_modules
from quantkit.models.moe import from_hub_names, swap_experts
from quantkit.scheme import ModuleGrid

log = logging.getLogger(__name__)


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_refusal(folder, pickles[0])
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{folder}: weight shard {f.name} named in the index is missing")
    return files


def read_tensors(folder: Path, skip: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """Every tensor of the checkpoint's weight files, but those whose name `skip` accepts (never read)."""
    out: dict[str, Tensor] = {}
    for f in weight_files(folder):
        out.update(load(f, None if skip is None else lambda k: not skip(k)))
    return out


def skeleton(source: Path | Any, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The architecture with parameters on the meta device and real buffers (rotary tables); `source` is a
    checkpoint folder or a transformers config."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if isinstance(source, Path):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    else:
        config = copy.deepcopy(source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # no_init_weights: the random init of meta parameters is skipped (every one is assigned from the
    # checkpoint; 0.16 s of Python per 1B model); buffers (rotary tables) are built by the modules' __init__
    with init_empty_weights(include_buffers=False), no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def load_packed(folder: Path, qc: dict[str, Any], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                ready: dict[str, nn.Module] | None = None) -> nn.Module:
    """The checkpoint's model with reference QuantLinears, but for the Linears `ready` supplies already
    built ({module name: module}, from the packed-weight cache): their tensors are not read."""
    model = skeleton(folder, dtype, trust_remote_code)
    swap_experts(model)  # MoE: per-expert Linears, as quantized; hub names (experts.{e}.w1, ...) -> module names
    ready = ready or {}

    def supplied(key: str) -> bool:
        return key.rsplit(".", 1)[0] in ready

    tensors = from_hub_names(model, read_tensors(folder, skip=supplied))
    tensors = {k: t for k, t in tensors.items() if not supplied(k)}  # MoE: hub names differ from module names
    for name, mod in ready.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear) or (lin.in_features, lin.out_features) != (mod.in_features, mod.out_features):
            raise CheckpointError(f"{folder}: cached packed layer {name} does not match the architecture "
                                  f"({type(lin).__name__}); remove the packed-weight cache entry")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, mod)
    return assemble(model, tensors, qc, str(folder), dtype).to(device).eval()


def packed_model(config: Any, tensors: dict[str, Tensor], qc: dict[str, Any], dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> nn.Module:
    """The model a checkpoint of `tensors` and `qc` loads as, built in memory (before it is written; a quantized
    KV cache's scales are not measured yet, so its cache stays float)."""
    model = skeleton(config, dtype, trust_remote_code)
    swap_experts(model)
    return assemble(model, from_hub_names(model, dict(tensors)), qc, "checkpoint", dtype, kv_scales=False).eval()


def assemble(model: nn.Module, tensors: dict[str, Tensor], qc: dict[str, Any], where: str,
             dtype: torch.dtype, kv_scales: bool = True) -> nn.Module:
    """Put the checkpoint's tensors in the skeleton: QuantLinears where a Linear is quantized, KV-cache scales on
    the attention modules (a quantized cache), every shape checked first."""
    layout, scheme = detect_format(qc).read(qc)
    kv = pop_kv_scales(tensors) if scheme.kv_cache and kv_scales else None
    marker = "." + getattr(layout, "marker", "qweight")  # compressed-tensors marks a quantized Linear by weight_packed
    quantized = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(marker)})
    embeddings = [n for n in quantized if isinstance(_module(model, n), nn.Embedding)]
    if embeddings:
        dequantize_embeddings(tensors, embeddings, qc, model, where)
    grids = read_dynamic(qc, ModuleGrid(bits=scheme.bits, group_size=scheme.group_size))
    for name in (n for n in quantized if n not in embeddings):
        grid = grids.grid(name)
        if grid is None:
            raise CheckpointError(f"{where}: {name} is stored quantized but the dynamic config leaves it unquantized")
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: quantized tensor {name}.qweight matches no module of the architecture") from None
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{where}: {name} is a {type(lin).__name__}, not a Linear")
        # placeholders on meta: load_state_dict(assign=True) puts the checkpoint's tensors in their place
        qlin = QuantLinear(lin.in_features, lin.out_features, grid.bits, grid.group_size, scheme.sym,
                           layout, bias=f"{name}.bias" in tensors, device="meta", act=scheme.input_activations)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, qlin)
    expected = dict(model.state_dict())
    for k, t in tensors.items():
        if k not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {k} (not part of {type(model).__name__})")
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
        if t.is_floating_point() and t.dtype.itemsize > 1 and not k.endswith((".scales", ".weight_scale", ".input_scale")):
            tensors[k] = t.to(dtype)
    missing = set(expected) - set(tensors)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    still = [k for k, t in model.state_dict().items() if t.is_meta] if missing else []
    if still:
        raise CheckpointError(f"{where}: missing tensors: {', '.join(sorted(still)[:5])}")
    if kv is not None:
        attach_kv(model, kv, where)
    return model


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def dequantize_embeddings(tensors: dict[str, Tensor], names: list[str], qc: dict[str, Any], model: nn.Module,
                          where: str) -> None:
    """Quantized token embeddings (compressed-tensors' `Embedding` group) -> their float `weight` in `tensors`:
    exactly the stored grid s * (q - z), computed in float32, which the lookup and a tied lm_head then use."""
    grid = embedding_grid(qc)
    if grid is None:
        raise CheckpointError(f"{where}: {names[0]} is stored quantized but quantization_config has no Embedding group")
    bits, group_size, sym = grid
    layout = CTLayout(sym=sym)
    for name in names:
        vocab, hidden = model.get_submodule(name).weight.shape
        parts = {}
        for key, (shape, _) in layout.shapes(vocab, hidden, bits, group_size).items():
            t = tensors.pop(f"{name}.{key}", None)
            if t is None or tuple(t.shape) != tuple(shape):
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise CheckpointError(f"{where}: quantized embedding tensor {name}.{key}: {got}, expected {tuple(shape)}")
            parts[key] = t
        tensors[f"{name}.weight"] = layout.unpack(parts, bits, group_size, sym).dequantize(torch.float32)


def pop_kv_scales(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Take the KV-cache scales (`<attention>.k_scale`, `<attention>.v_scale`) out of `tensors`, by attention module."""
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((f".{K_SCALE}", f".{V_SCALE}"))})
    out = {}
    for name in names:
        k, v = tensors.pop(f"{name}.{K_SCALE}", None), tensors.pop(f"{name}.{V_SCALE}", None)
        if k is None or v is None or k.numel() != 1 or v.numel() != 1:
            raise CheckpointError(f"KV-cache scales of {name}: need one {K_SCALE} and one {V_SCALE} value each")
        out[name] = (k.float().reshape(1), v.float().reshape(1))
    return out


def attach_kv(model: nn.Module, scales: dict[str, tuple[Tensor, Tensor]], where: str) -> None:
    """The quantized cache: each decoder block's attention gets its scales (every block must have them)."""
    spec = find_arch(model)
    if spec is not None:
        attn = attention_modules(model, get_blocks(model, spec))
    else:
        attn = {name: model.get_submodule(name) for name in scales}
    try:
        attach(model, attn, scales)
    except KVCacheError as e:
        raise CheckpointError(f"{where}: {e}") from None
