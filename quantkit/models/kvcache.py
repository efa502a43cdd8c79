"""The quantized KV cache: where keys and values are hooked, the FP8 maths, and the cache's size.

vLLM quantizes the cache at the point where the attention layer writes it: keys after the rotary
embedding (and any key norm), values as projected, both before GQA repeats the KV heads, one scale
per layer for each (`k_scale`, `v_scale`): stored = fp8(clamp(x / scale, +-448)), read back as
stored * scale, with scale = max|x| / 448 from calibration (compressed-tensors' kv_cache_scheme:
8-bit float, per tensor, static, symmetric).

transformers' attention modules hand exactly those tensors (query, key, value after RoPE and the
cache update, before `repeat_kv`) to the function registered for `config._attn_implementation`.
quantkit registers a wrapper of the model's own implementation under a new name
(`quantkit-kv|sdpa`, ...; it changes nothing for other models) that fake-quantizes key and value
with the scales attached to the attention module, or records their max |x| while calibrating.
An architecture whose attention does not go through that interface cannot be hooked: `check_hookable`
says so before anything is quantized, and a forward that misses a layer is refused as well.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError
from quantkit.grid import FP8_MAX, quantize_activations

PREFIX = "quantkit-kv|"
K_SCALE, V_SCALE = "k_scale", "v_scale"  # llm-compressor's names, under the attention module (vLLM remaps them)
_AMAX = "_quantkit_kv_amax"  # (k, v) running max |x| while calibrating


class KVCacheError(QuantkitError):
    """--kv-cache cannot apply: the format cannot carry it or the architecture's attention cannot be hooked."""


def kv_cache_scheme() -> dict[str, Any]:
    """compressed-tensors' kv_cache_scheme (QuantizationArgs) for an FP8 cache, as llm-compressor serializes it."""
    return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor",
            "block_structure": None, "dynamic": False, "actorder": None, "scale_dtype": None, "zp_dtype": None,
            "observer": "minmax", "observer_kwargs": {}}


def check_kv_cache_scheme(args: Any) -> None:
    """Refuse a kv_cache_scheme quantkit cannot compute: anything but FP8 per tensor, static, symmetric."""
    ok = isinstance(args, dict) and args.get("num_bits", 8) == 8 and args.get("type") == "float" and \
        args.get("strategy", "tensor") in ("tensor", None) and not args.get("dynamic") and args.get("symmetric", True)
    if not ok:
        raise KVCacheError(f"kv_cache_scheme {args!r}: quantkit reads an FP8 cache with static per-tensor "
                           f"scales (num_bits 8, type float, strategy tensor, dynamic false, symmetric)")


def scale_from_amax(amax: Tensor) -> Tensor:
    """One layer's FP8 scale: max|x| / 448 (float32; a zero max gives the smallest normal float)."""
    return (amax.float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny).reshape(1)


def fake_quant(x: Tensor, scale: Tensor) -> Tensor:
    """x as an FP8 cache stores and returns it: fp8(clamp(x / scale, +-448)) * scale, in float32, back in x's dtype."""
    return quantize_activations(x.float(), "float", scale.float()).to(x.dtype)


def attention_modules(model: nn.Module, blocks: nn.ModuleList) -> dict[str, nn.Module]:
    """Each decoder block's attention module (the child whose class name ends in Attention), by full name."""
    prefix = {id(b): n for n, b in model.named_modules()}
    out = {}
    for block in blocks:
        found = [(n, m) for n, m in block.named_children() if type(m).__name__.lower().endswith("attention")]
        if len(found) != 1:
            raise KVCacheError(f"{type(block).__name__} has {len(found)} attention modules; quantkit hooks exactly one "
                               f"per decoder block, so --kv-cache cannot apply to this architecture")
        out[f"{prefix[id(block)]}.{found[0][0]}"] = found[0][1]
    return out


def check_hookable(attn: dict[str, nn.Module], arch: str) -> None:
    """Refuse attention modules that do not call transformers' attention interface (nothing to hook)."""
    for name, mod in attn.items():
        try:
            src = inspect.getsource(type(mod).forward)
        except (OSError, TypeError):
            src = ""
        if "ALL_ATTENTION_FUNCTIONS" not in src:
            raise KVCacheError(f"{arch}: the attention of {name} ({type(mod).__name__}) does not go through "
                               f"transformers' attention interface, so quantkit cannot hook its keys and values; "
                               f"--kv-cache is not available for this architecture")


def _wrapped(base: str) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        amax = getattr(module, _AMAX, None)
        if amax is not None:  # calibrating: record, do not quantize
            amax[0] = torch.maximum(amax[0], key.detach().abs().amax().float())
            amax[1] = torch.maximum(amax[1], value.detach().abs().amax().float())
        elif hasattr(module, K_SCALE):
            key, value = fake_quant(key, getattr(module, K_SCALE)), fake_quant(value, getattr(module, V_SCALE))
        if base == "eager":
            fn = _eager(module)
        else:
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, sdpa_attention_forward)
        return fn(module, query, key, value, *args, **kwargs)

    return attention


def _eager(module: nn.Module) -> Any:
    """The eager attention function of the module's own modelling file."""
    fn = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if fn is None:
        raise KVCacheError(f"{type(module).__name__}: no eager_attention_forward to wrap")
    return fn


def install(model: nn.Module) -> str:
    """Route the model's attention through quantkit's wrapper of its implementation; returns the new name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    config = model.config
    base = config._attn_implementation or "eager"
    if base.startswith(PREFIX):
        return base
    if base not in ("sdpa", "eager"):
        base = "sdpa"  # flash / flex kernels take no fake-quantized cache here: the exact maths runs in sdpa
    name = PREFIX + base
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _wrapped(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation = name
    for sub in model.modules():  # sub-configs (vision towers, text configs) seen by the attention modules
        cfg = getattr(sub, "config", None)
        if cfg is not None and cfg is not config and getattr(cfg, "_attn_implementation", None) == base:
            cfg._attn_implementation = name
    return name


def attach(model: nn.Module, attn: dict[str, nn.Module], scales: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Give every attention module its (k_scale, v_scale) and route the model's attention through the wrapper."""
    missing = sorted(set(attn) - set(scales))
    if missing or set(scales) - set(attn):
        raise KVCacheError(f"KV-cache scales for {len(scales)} attention modules, the model has {len(attn)} "
                           f"(first missing: {missing[0] if missing else sorted(set(scales) - set(attn))[0]})")
    for name, mod in attn.items():
        k, v = scales[name]
        mod.register_buffer(K_SCALE, k.detach().float().reshape(1).clone(), persistent=False)
        mod.register_buffer(V_SCALE, v.detach().float().reshape(1).clone(), persistent=False)
    install(model)


@contextmanager
def observing(model: nn.Module, attn: dict[str, nn.Module]) -> Iterator[dict[str, list[Tensor]]]:
    """Record each attention module's max |key| and max |value| over the forwards run inside the block."""
    install(model)
    amax: dict[str, list[Tensor]] = {}
    for name, mod in attn.items():
        amax[name] = [torch.full((), -1.0), torch.full((), -1.0)]  # -1: never reached
        setattr(mod, _AMAX, amax[name])
    try:
        yield amax
    finally:
        for mod in attn.values():
            delattr(mod, _AMAX)


def scales_from(amax: dict[str, list[Tensor]], arch: str) -> dict[str, tuple[Tensor, Tensor]]:
    """(k_scale, v_scale) per attention module; a module the forwards never reached cannot be hooked."""
    out = {}
    for name, (k, v) in amax.items():
        if float(k) < 0 or float(v) < 0:
            raise KVCacheError(f"{arch}: the attention of {name} never reached quantkit's KV hook, so its keys and "
                               f"values cannot be calibrated; --kv-cache is not available for this architecture")
        out[name] = (scale_from_amax(k), scale_from_amax(v))
    return out


def bytes_per_token(config: Any, bytes_per_value: int) -> int | None:
    """KV-cache bytes per token: layers x KV heads x head dim x 2 (key and value) x bytes (GQA-aware), from a
    transformers config or its dict; None when the config does not say."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    text = get("text_config")
    if text:
        return bytes_per_token(text, bytes_per_value)
    layers, heads, hidden = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
    if not (layers and heads):
        return None
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or (hidden // heads if hidden else None)
    if not head_dim:
        return None
    return int(layers) * int(kv_heads) * int(head_dim) * 2 * bytes_per_value
