"""The quantization scheme: validated data, plus presets as plain dicts.

A scheme says *what* grid the weights go on (bits, number type, group size, symmetry,
act-order) and, optionally, how the Linears' input activations are quantized at run time
(`ActivationScheme`, in the style of compressed-tensors' QuantizationArgs); methods say
*how* the weights' codes are chosen (RTN, GPTQ, AWQ).

Weight strategy: group (group_size > 0), channel (group_size -1) or tensor (`strategy="tensor"`,
one scale for the whole weight). Number type: int, or float (FP8 e4m3: 8 bits, symmetric, per channel
or per tensor).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_serializer, model_validator

from quantkit.errors import SchemeError, UnknownNameError

DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "*embed_tokens*", "*embed_positions*", "*wte*", "*wpe*")
EMBEDDING_TYPES: tuple[str, ...] = ("int8", "int4")  # QuantScheme.embedding

PRESETS: dict[str, dict[str, Any]] = {
    "w4g128": {"bits": 4, "group_size": 128},
    "w4g64": {"bits": 4, "group_size": 64},
    "w4g32": {"bits": 4, "group_size": 32},
    "w3g64": {"bits": 3, "group_size": 64},
    "w8": {"bits": 8, "group_size": -1},
    # weights and activations in 8 bits (compressed-tensors int-quantized / float-quantized, as vLLM serves them)
    "w8a8": {"bits": 8, "group_size": -1, "sym": True,
             "input_activations": {"type": "int", "strategy": "token", "dynamic": True}},
    "w8a8-static": {"bits": 8, "group_size": -1, "sym": True,
                    "input_activations": {"type": "int", "strategy": "tensor", "dynamic": False}},
    # observer mse: each channel's FP8 scale chosen for the least weight error (session 14: KL 0.0268 -> see
    # benchmarks/results/w8a8.md), still the per-channel float-quantized layout vLLM loads
    "fp8-dynamic": {"bits": 8, "group_size": -1, "sym": True, "type": "float", "observer": "mse",
                    "input_activations": {"type": "float", "strategy": "token", "dynamic": True}},
    "fp8": {"bits": 8, "group_size": -1, "sym": True, "type": "float", "strategy": "tensor",
            "input_activations": {"type": "float", "strategy": "tensor", "dynamic": False}},
}
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class ActivationScheme(BaseModel):
    """How a Linear's input activations are quantized at run time (compressed-tensors' `input_activations`).

    type:     int (int8, q in [-128, 127]) or float (FP8 e4m3, |q| <= 448).
    strategy: token (one scale per token, computed at run time), tensor (one scale), channel or group.
    dynamic:  True: scales computed from each input at run time (token); False: calibrated scales in the
              checkpoint (`input_scale`, tensor).
    The grid is symmetric: scale = max|x| / 127.5 (int8) or max|x| / 448 (FP8), as compressed-tensors computes it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bits: Literal[8] = 8
    type: Literal["int", "float"] = "int"
    strategy: Literal["tensor", "channel", "group", "token"] = "token"
    dynamic: bool = True
    symmetric: Literal[True] = True

    @model_validator(mode="after")
    def _consistent(self) -> "ActivationScheme":
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("per-token activation scales exist only at run time: token needs dynamic")
        if not self.dynamic and self.strategy != "tensor":
            raise ValueError(f"static activation scales are per tensor, not per {self.strategy}")
        if self.dynamic and self.strategy != "token":
            raise ValueError(f"dynamic activation scales are per token, not per {self.strategy}")
        return self

    @property
    def qmax(self) -> float:
        """The grid's half range: scale = max|x| / qmax (compressed-tensors: bit range / 2)."""
        return FP8_MAX if self.type == "float" else 127.5


class ModuleGrid(BaseModel):
    """One Linear's own integer grid (a per-module override of the scheme's bits and group size)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[2, 3, 4, 8]
    group_size: int

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        return _check_group_size(v)

    @property
    def label(self) -> str:
        return f"w{self.bits}" + ("" if self.group_size == -1 else f"g{self.group_size}")


def _check_group_size(v: int) -> int:
    if v != -1 and v <= 0:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {v}")
    if v > 0 and v % 32:
        raise ValueError(f"group_size must be a multiple of 32 (packing needs it), got {v}")
    return v


class QuantScheme(BaseModel):
    """Integer grid for the weights of every quantized Linear.

    bits:         2, 3, 4 or 8 bits per weight.
    group_size:   inputs sharing one (scale, zero); -1 means one group per output channel.
    sym:          symmetric grid (zero fixed at 2**(bits-1)) or asymmetric (integer zero per group).
    desc_act:     GPTQ act-order: quantize columns by decreasing Hessian diagonal (writes g_idx).
    static_groups: with desc_act, fix group parameters before reordering (keeps g_idx trivial order).
    skip:         fnmatch patterns of module names (full or last component) left in full precision.
    type:         the weights' number type: int (integer codes) or float (FP8 e4m3 values).
    strategy:     None (group or channel, from group_size) or "tensor" (one scale per weight; group_size -1).
    observer:     how FP8 weight scales are chosen (`quantkit.grid.fit_fp8`): minmax (max|w| / 448, as
                  llm-compressor) or mse (per channel, the least-squared-error scale among 32 candidates at or
                  above max|w| / 448; data-free). Only the scales' values differ: the checkpoint layout is the same.
    input_activations: None (weight-only) or how activations are quantized at run time.
    kv_cache:     None (the engine's float cache) or "fp8": keys (after the rotary embedding) and values stored
                  in FP8 e4m3 with one calibrated scale per layer each (compressed-tensors' kv_cache_scheme).
    embedding:    None (the token embedding stays float) or how it is stored, round-to-nearest, data-free: int8
                  (symmetric, one scale per token row) or int4 (the scheme's group size and symmetry). A tied
                  lm_head computes the logits with the same stored weight. compressed-tensors only.
    rotation:     None, or a rotation of the residual stream fused into the weights before quantization
                  (quantkit.models.rotation: "hadamard" or "random"); the output head is then stored untied.
    overrides:    {exact module name: ModuleGrid}: Linears quantized on their own (bits, group_size) instead of the
                  scheme's (integer weight-only grids; the GPTQ format writes them as its `dynamic` config).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    sym: bool = False
    desc_act: bool = False
    static_groups: bool = False
    skip: tuple[str, ...] = DEFAULT_SKIP
    type: Literal["int", "float"] = "int"
    strategy: Literal["tensor"] | None = None
    observer: Literal["minmax", "mse"] = "minmax"
    input_activations: ActivationScheme | None = None
    kv_cache: Literal["fp8"] | None = None
    embedding: Literal["int8", "int4"] | None = None
    rotation: Literal["hadamard", "random"] | None = None

    @field_validator("rotation", mode="before")
    @classmethod
    def _rotation(cls, v: Any) -> Any:
        if v is not None and v not in ("hadamard", "random"):
            raise ValueError(f"--rotate {v} is not a rotation quantkit applies; use hadamard or random")
        return v

    @field_validator("embedding", mode="before")
    @classmethod
    def _embedding(cls, v: Any) -> Any:
        if v is not None and v not in EMBEDDING_TYPES:
            raise ValueError(f"--embedding {v} is not an embedding type quantkit writes; use int8 or int4")
        return v

    overrides: dict[str, ModuleGrid] = {}

    @field_validator("kv_cache", mode="before")
    @classmethod
    def _kv_cache(cls, v: Any) -> Any:
        if v is not None and v != "fp8":
            raise ValueError(f"--kv-cache {v} is not a cache type quantkit writes; fp8 is (e4m3, one scale per layer)")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """kv_cache, embedding and rotation appear only when set, observer only when not minmax: schemes without them
        dump (and fingerprint) as before."""
        out = handler(self)
        if out.get("observer") == "minmax":
            out.pop("observer", None)
        for key in ("kv_cache", "embedding", "rotation"):
            if out.get(key) is None:
                out.pop(key, None)
        if not out.get("overrides"):  # likewise per-module grids
            out.pop("overrides", None)
        else:
            out["overrides"] = dict(sorted(out["overrides"].items()))
        return out

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        return _check_group_size(v)

    def __hash__(self) -> int:  # the overrides are a dict: hash the canonical dump (equal schemes dump alike)
        return hash(self.model_dump_json())

    @model_validator(mode="after")
    def _consistent(self) -> "QuantScheme":
        if self.type == "float" and (self.bits != 8 or not self.sym or self.group_size != -1 or self.desc_act):
            raise ValueError("float (FP8 e4m3) weights are 8-bit, symmetric, per channel or per tensor "
                             "(bits 8, sym, group_size -1, no desc_act)")
        if self.observer != "minmax" and self.type != "float":
            raise ValueError(f"observer {self.observer} chooses FP8 weight scales: it needs float (FP8) weights")
        if self.strategy == "tensor" and self.group_size != -1:
            raise ValueError("per-tensor weights have no groups: group_size must be -1")
        act = self.input_activations
        if act is not None:
            if self.bits != 8 or not self.sym or self.group_size != -1 or self.desc_act:
                raise ValueError("8-bit activations go with 8-bit symmetric weights per channel or per tensor "
                                 "(bits 8, sym, group_size -1, no desc_act), as W8A8 kernels compute them")
            if act.type != self.type:
                raise ValueError(f"{act.type} activations need {act.type} weights (got {self.type} weights)")
        if self.embedding is not None and (act is not None or self.type != "int" or self.strategy is not None):
            raise ValueError("a quantized embedding goes with weight-only integer schemes (compressed-tensors "
                             "pack-quantized), not with 8-bit activation or FP8 presets")
        if self.overrides and (self.type != "int" or self.strategy is not None or act is not None):
            raise ValueError("per-module grids are integer weight-only grids; FP8, per-tensor and activation "
                             "schemes have none")
        return self

    @property
    def weight_strategy(self) -> str:
        """compressed-tensors' name for the weight grid: group, channel or tensor."""
        return self.strategy or ("channel" if self.group_size == -1 else "group")

    @property
    def embedding_grid(self) -> tuple[int, int, bool] | None:
        """(bits, group_size, sym) of the stored token embedding, or None (float)."""
        if self.embedding is None:
            return None
        return (8, -1, True) if self.embedding == "int8" else (4, self.group_size, self.sym)

    @property
    def activation_static(self) -> bool:
        """Calibrated (static) input scales: the method must measure them."""
        return self.input_activations is not None and not self.input_activations.dynamic

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def grid_of(self, name: str) -> ModuleGrid:
        """The (bits, group_size) of the Linear `name` (full module name): its override, or the scheme's."""
        return self.overrides.get(name) or ModuleGrid(bits=self.bits, group_size=self.group_size)

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def skips(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in self.skip)

    def check_layers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Refuse a scheme that cannot apply: `shapes` maps Linear name -> (out_features, in_features)."""
        unknown = sorted(set(self.overrides) - set(shapes))
        if unknown:
            raise SchemeError(f"per-module grid for {unknown[0]}: no such quantized Linear"
                              + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        for name, (out_f, in_f) in shapes.items():
            gs = self.grid_of(name).group_size
            if name in self.overrides and gs > 0 and in_f % gs:
                raise SchemeError(f"per-module group_size {gs} does not divide in_features {in_f} of {name}")
            if self.group_size > 0 and in_f % self.group_size and name not in self.overrides:
                fits = [g for g in (128, 64, 32) if all(i % g == 0 for _, i in shapes.values())]
                options = [str(g) for g in fits + [-1]]
                hint = ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]
                raise SchemeError(
                    f"group_size {self.group_size} does not divide in_features {in_f} of {name}; use {hint}"
                )
            if in_f % 32:
                raise SchemeError(f"in_features {in_f} of {name} is not a multiple of 32; add it to --skip")
            if out_f % 32:
                raise SchemeError(f"out_features {out_f} of {name} is not a multiple of 32; add it to --skip")


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "scheme"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid scheme: " + "; ".join(parts)


def make_scheme(preset: str | None = None, **overrides: Any) -> QuantScheme:
    """Build a scheme from an optional preset name and field overrides (None values are ignored)."""
    fields: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UnknownNameError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        fields.update(PRESETS[preset])
    given = {k: v for k, v in overrides.items() if v is not None}
    if preset is not None and PRESETS[preset].get("input_activations"):
        for key in ("bits", "group_size", "sym", "desc_act"):
            if key in given and given[key] != PRESETS[preset].get(key, False):
                flag = key.replace("_", "-") if key != "sym" else ("sym" if given[key] else "asym")
                value = "" if key in ("sym", "desc_act") else f" {given[key]}"
                raise SchemeError(f"--preset {preset} quantizes activations and fixes its weights at 8 bits, "
                                  f"symmetric, per channel; --{flag}{value} conflicts with it")
    fields.update(given)
    if "skip" in fields:
        fields["skip"] = tuple(fields["skip"])
    try:
        return QuantScheme(**fields)
    except ValidationError as err:
        raise SchemeError(_one_line(err)) from None
