"""Per-tensor GGUF types for llama.cpp's named mixes (q4_k_m, q3_k_s, iq4_xs ...), chosen by llama-quantize's rules.

Restated from llama.cpp's src/llama-quant.cpp (llama_tensor_get_type) for the dense decoder
architectures quantkit exports (n_expert = 1, not Falcon, not 70B):
- every 2-D `.weight` but norms is quantized; a mix starts from its base type;
- output.weight (or token_embd.weight when the embeddings are tied) takes Q6_K, or Q8_0 when
  its row width is not a multiple of the base type's block; an untied token_embd keeps the base;
- attn_v / ffn_down / attn_output are promoted in the layers llama.cpp promotes them;
- then the shape fallback: a row width that is not a multiple of 256 turns Q2_K/Q3_K into Q4_0,
  Q4_K into Q5_0, Q5_K into Q5_1, Q6_K into Q8_0, IQ4_XS into IQ4_NL (F16 if even 32 fails).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

Q = GGMLQuantizationType
FT = LlamaFileType

# mix name -> (llama.cpp file type, base tensor type)
MIXES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "q2_k": (FT.MOSTLY_Q2_K, Q.Q2_K),
    "q3_k_s": (FT.MOSTLY_Q3_K_S, Q.Q3_K), "q3_k_m": (FT.MOSTLY_Q3_K_M, Q.Q3_K), "q3_k_l": (FT.MOSTLY_Q3_K_L, Q.Q3_K),
    "q4_k_s": (FT.MOSTLY_Q4_K_S, Q.Q4_K), "q4_k_m": (FT.MOSTLY_Q4_K_M, Q.Q4_K),
    "q5_k_s": (FT.MOSTLY_Q5_K_S, Q.Q5_K), "q5_k_m": (FT.MOSTLY_Q5_K_M, Q.Q5_K),
    "q6_k": (FT.MOSTLY_Q6_K, Q.Q6_K),
    "iq4_nl": (FT.MOSTLY_IQ4_NL, Q.IQ4_NL), "iq4_xs": (FT.MOSTLY_IQ4_XS, Q.IQ4_XS),
    "q4_0": (FT.MOSTLY_Q4_0, Q.Q4_0), "q4_1": (FT.MOSTLY_Q4_1, Q.Q4_1),
    "q5_0": (FT.MOSTLY_Q5_0, Q.Q5_0), "q5_1": (FT.MOSTLY_Q5_1, Q.Q5_1), "q8_0": (FT.MOSTLY_Q8_0, Q.Q8_0),
}
K_MIXES = tuple(k for k in MIXES if k not in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"))
_FALLBACK = {Q.IQ4_XS: Q.IQ4_NL, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    for key in ("attn_v", "attn_qkv", "attn_k", "attn_q", "attn_output", "ffn_down", "ffn_gate", "ffn_up"):
        if f".{key}." in name:
            return key
    if name.startswith("token_embd."):
        return "token_embd"
    if name.startswith("output."):
        return "output"
    return "other"


def fallback(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    """tensor_type_fallback: the type llama.cpp writes when rows of `ncols` do not split into qtype's blocks."""
    if ncols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    new = _FALLBACK.get(qtype, qtype)
    return new if ncols % GGML_QUANT_SIZES[new][0] == 0 else Q.F16


@dataclass
class MixPlanner:
    """Assigns types tensor by tensor in file order (llama.cpp counts attn_v and ffn_down as it goes).

    `tensors`: every (llama.cpp name, shape) the file will hold, in file order.
    `n_gqa`: attention heads per KV head. `has_imatrix`: llama.cpp changes two rules with one.
    `embd_type` / `output_type`: overrides, as llama-quantize's --token-embedding-type / --output-tensor-type.
    """

    mix: str
    tensors: list[tuple[str, tuple[int, ...]]]
    n_layer: int
    n_gqa: int = 1
    has_imatrix: bool = False
    embd_type: GGMLQuantizationType | None = None
    output_type: GGMLQuantizationType | None = None

    def __post_init__(self) -> None:
        self.ftype, self.base = MIXES[self.mix]
        cats = [_category(n) for n, _ in self.tensors]
        self.n_attn_v = sum(c in ("attn_v", "attn_qkv") for c in cats)
        self.tied = "output" not in cats
        self.i_attn_v = self.i_ffn_down = 0

    @staticmethod
    def quantizable(name: str, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name

    def type_of(self, name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        """The type of the next tensor (call once per tensor, in file order)."""
        if not self.quantizable(name, shape):
            return Q.F32 if len(shape) == 1 else Q.F16
        cat = _category(name)
        if cat == "token_embd" and self.embd_type is not None:
            return self.embd_type
        if cat == "output" and self.output_type is not None:
            return self.output_type
        return fallback(self._rule(name, shape, cat), shape[-1])

    def _rule(self, name: str, shape: tuple[int, ...], cat: str) -> GGMLQuantizationType:
        ft, new = self.ftype, self.base
        if cat == "output" or (self.tied and cat == "token_embd"):
            if shape[-1] % GGML_QUANT_SIZES[new][0]:
                return Q.Q8_0
            return new if new == Q.Q8_0 else Q.Q6_K
        if cat in ("attn_v", "attn_qkv"):
            i, n = self.i_attn_v, self.n_attn_v
            self.i_attn_v += 1
            if cat == "attn_qkv":
                return {FT.MOSTLY_Q3_K_M: Q.Q4_K, FT.MOSTLY_Q3_K_L: Q.Q4_K, FT.MOSTLY_Q4_K_M: Q.Q5_K,
                        FT.MOSTLY_Q5_K_M: Q.Q6_K}.get(ft, new)
            if ft == FT.MOSTLY_Q2_K:
                return Q.Q4_K if self.n_gqa >= 4 else Q.Q3_K
            if ft == FT.MOSTLY_Q3_K_M:
                return Q.Q5_K if i < 2 else Q.Q4_K
            if ft == FT.MOSTLY_Q3_K_L:
                return Q.Q5_K
            if ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and self.n_gqa >= 4:
                return Q.Q5_K
            if ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _more_bits(i, n):
                return Q.Q6_K
            if ft == FT.MOSTLY_Q4_K_S and i < 4:
                return Q.Q5_K
            return new
        if cat == "ffn_down":
            i, n = self.i_ffn_down, self.n_layer
            self.i_ffn_down += 1
            if ft == FT.MOSTLY_Q2_K:
                return Q.Q3_K
            if ft == FT.MOSTLY_Q3_K_M:
                return Q.Q5_K if i < n // 16 else Q.Q4_K
            if ft == FT.MOSTLY_Q3_K_L:
                return Q.Q5_K
            if ft == FT.MOSTLY_Q4_K_M:
                return Q.Q6_K if _more_bits(i, n) else new
            if ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and i < n // 8 and not self.has_imatrix:
                return Q.Q5_K
            if ft == FT.MOSTLY_Q5_K_M:
                return Q.Q6_K if _more_bits(i, n) else new
            if ft == FT.MOSTLY_Q4_K_S and i < n // 8:
                return Q.Q5_K
            if ft in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and self.has_imatrix and i < n // 8:
                return Q.Q4_1 if ft == FT.MOSTLY_Q4_0 else Q.Q5_1
            return new
        if cat == "attn_output":
            return {FT.MOSTLY_Q2_K: Q.Q3_K, FT.MOSTLY_Q3_K_M: Q.Q4_K, FT.MOSTLY_Q3_K_L: Q.Q5_K}.get(ft, new)
        return new

    def plan(self) -> dict[str, GGMLQuantizationType]:
        """Every tensor's type (a fresh pass over `tensors`)."""
        self.i_attn_v = self.i_ffn_down = 0
        out = {name: self.type_of(name, shape) for name, shape in self.tensors}
        self.i_attn_v = self.i_ffn_down = 0
        return out
