"""bitsandbytes NF4 / FP4 (4-bit, blocks of 64 weights) and LLM.int8, through transformers.

bitsandbytes quantizes while transformers loads the float model with a
`BitsAndBytesConfig`; no calibration data is involved. quantkit only chooses
the configuration (options + skip list), keeps the non-quantized tensors at the
precision the checkpoint stores (`save_dtype`), and writes the folder with
`save_pretrained` plus tokenizer, generation config and quantkit.json.

The scheme's grid fields (bits, group_size, sym, desc_act) do not apply: the
method fixes the grid (4-bit codes with one absmax per 64 weights, or int8 rows
with one fp32 scale per output channel). Only `scheme.skip` is used (fnmatch
patterns over Linear names, expanded to exact names for transformers).
"""

from __future__ import annotations

import logging
import tempfile
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from torch import nn

from quantkit.errors import ModelSourceError, QuantkitError
from quantkit.formats.bnb import (QUANT_METHOD, cast_unquantized, is_bnb_module, require_bitsandbytes,
                                  unquantized_params)
from quantkit.formats.checkpoint import PROVENANCE, save_tokenizer_and_generation, write_json
from quantkit.formats.shards import DEFAULT_MAX_SHARD_SIZE
from quantkit.methods.base import MethodBase, QuantJob
from quantkit.models.moe import moe_architecture
from quantkit.models.sources import ModelSource, _load_tokenizer, load_model, read_config
from quantkit.scheme import QuantScheme
from quantkit.version import __version__

log = logging.getLogger(__name__)

COMPUTE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORAGE_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, **COMPUTE_DTYPES}
# Spellings users type for the same dtypes (torch names), mapped to the option values.
DTYPE_ALIASES: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                                 "float": "fp32"}
BLOCK_4BIT = 64  # weights per absmax block: fixed by transformers' BitsAndBytesConfig


# ----------------------------------------------------------------------------- options

def _describe(err: ValidationError, method: str, fields: list[str]) -> str:
    """One line for pydantic's errors, naming the option and the values it accepts."""
    parts = []
    for e in err.errors():
        name = ".".join(str(x) for x in e["loc"]) or "options"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown option {name!r} for {method}; its options are: {', '.join(fields)}")
        elif e["type"] == "literal_error":
            parts.append(f"{name} {e['input']!r} is not valid for {method}; choose one of: {e['ctx']['expected']}")
        else:
            parts.append(f"{method} option {name}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class _BnbOptions(BaseModel):
    """Options whose every error is one QuantkitError line (the CLI maps it to exit code 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method_label: ClassVar[str] = "bitsandbytes"
    misplaced: ClassVar[dict[str, str]] = {}  # option of another bnb method -> why it does not apply here

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, dict):
            for key, why in cls.misplaced.items():
                if key in data:
                    raise QuantkitError(why)
            data = {k: DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v for k, v in data.items()}
        try:
            return handler(data)
        except ValidationError as err:
            raise QuantkitError(_describe(err, cls.method_label, list(cls.model_fields))) from None


class FourBitOptions(_BnbOptions):
    """nf4 / fp4.

    double_quant:  quantize the fp32 absmax of each 64-weight block again to 8 bits (blocks of 256);
                   saves ~0.37 bit per weight.
    compute_dtype: dtype of the dequantized matmul; None = bf16 on CUDA, fp32 on CPU.
    quant_storage: dtype whose storage holds the packed 4-bit codes (uint8 unless FSDP needs a float).
    """

    method_label: ClassVar[str] = "nf4/fp4"
    misplaced: ClassVar[dict[str, str]] = {
        "int8_threshold": "int8_threshold applies to the int8 method only; remove --int8-threshold for nf4/fp4",
    }
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] | None = None
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = "uint8"


class Int8Options(_BnbOptions):
    """int8 (LLM.int8).

    int8_threshold: input features whose magnitude exceeds it are multiplied in fp16 instead of int8
                    (outlier decomposition); 0 turns the decomposition off.
    """

    method_label: ClassVar[str] = "int8"
    misplaced: ClassVar[dict[str, str]] = {
        "double_quant": "double quantization applies to the 4-bit methods (nf4, fp4) only; remove --double-quant for int8",
        "compute_dtype": "int8 has no compute dtype (LLM.int8 multiplies in int8 and fp16); remove --compute-dtype",
        "quant_storage": "quant_storage applies to the 4-bit methods (nf4, fp4) only; remove --quant-storage for int8",
    }
    int8_threshold: float = 6.0

    @field_validator("int8_threshold")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if not v >= 0.0:  # also rejects NaN
            raise ValueError(f"int8_threshold must be >= 0 (0 = no outlier decomposition), got {v}")
        return v


def resolve_compute_dtype(opts: FourBitOptions, device: torch.device) -> str:
    """The option, or bf16 on CUDA / fp32 elsewhere (bf16 matmuls are slow and lossy on most CPUs)."""
    if opts.compute_dtype is not None:
        return opts.compute_dtype
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


# ----------------------------------------------------------------------------- skip list

def linear_names(path: str, trust_remote_code: bool = False) -> list[str]:
    """Full names of every nn.Linear of the architecture at `path` (built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def skip_modules(linears: list[str], scheme: QuantScheme) -> list[str]:
    """The scheme's fnmatch patterns expanded to exact Linear names, for `llm_int8_skip_modules`.

    transformers treats those entries as regexes anchored at module boundaries, so
    passing exact names keeps quantkit's pattern semantics (e.g. `*.down_proj`).
    """
    return sorted(n for n in linears if scheme.skips(n))


# ----------------------------------------------------------------------------- artifact

def round_unquantized(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the non-quantized parameters to `dtype` precision in place, keeping their dtype.

    The model then computes exactly what the checkpoint (which stores them in `dtype`)
    reloaded in the same compute dtype computes.
    """
    for p in unquantized_params(model):
        p.data = p.data.to(dtype).to(p.dtype)


@contextmanager
def stored_as(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Temporarily cast the non-quantized parameters to `dtype` (save_pretrained writes what it holds)."""
    params = list(unquantized_params(model))
    before = [p.dtype for p in params]
    cast_unquantized(model, dtype)
    try:
        yield
    finally:
        for p, d in zip(params, before):
            p.data = p.data.to(d)


@dataclass
class BnbArtifact:
    """A model quantized by bitsandbytes, ready to be written with save_pretrained."""

    model: nn.Module
    tokenizer: Any
    method: str
    save_dtype: torch.dtype = torch.float16
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
        folder = Path(folder)
        with stored_as(self.model, self.save_dtype):
            # transformers 5 writes safetensors only; an int is a byte count, as in our own writer
            self.model.save_pretrained(folder, max_shard_size=max_shard_size)
        save_tokenizer_and_generation(self.model, self.tokenizer, folder)
        write_json(folder / PROVENANCE, {
            "quantkit_version": __version__,
            "method": self.method,
            "format": QUANT_METHOD,
            **self.extra,
        })


# ----------------------------------------------------------------------------- methods

@contextmanager
def float_folder(src: ModelSource, trust_remote_code: bool) -> Iterator[tuple[str, Any]]:
    """(path transformers can load with a quantization_config, tokenizer).

    Folders and hub ids are used as they are; a .gguf file is dequantized once into
    a temporary safetensors folder (transformers cannot quantize while reading GGUF).
    """
    if src.kind != "gguf":
        yield src.path, _load_tokenizer(src.path, trust_remote_code)
        return
    model, tok = load_model(src, torch.float32, trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="quantkit-gguf-") as tmp:
        model.save_pretrained(tmp)
        del model
        yield tmp, tok


class _Bitsandbytes(MethodBase):
    uses_scheme: ClassVar[bool] = False  # bits and grid are fixed by bitsandbytes; only the skip list applies
    quantizes_on_load: ClassVar[bool] = True
    formats: ClassVar[tuple[str, ...]] = (QUANT_METHOD,)

    @abstractmethod
    def bnb_config(self, opts: Any, device: torch.device, skip: list[str]) -> Any:
        """transformers' BitsAndBytesConfig for these options and exact skip names."""

    def describe_options(self, opts: Any, device: torch.device) -> dict[str, Any]:
        return {"options": opts.model_dump(mode="json")}

    def quantize(self, job: QuantJob) -> BnbArtifact:
        from transformers import AutoModelForCausalLM

        require_bitsandbytes()
        import bitsandbytes

        opts = job.options if isinstance(job.options, self.Options) else self.Options(**job.options.model_dump())
        trc = job.trust_remote_code
        with float_folder(job.source, trc) as (path, tok):
            if moe_architecture(read_config(Path(path))):
                raise QuantkitError(f"{self.name} (bitsandbytes) cannot quantize the fused 3-D experts of the MoE model "
                                    f"{job.source.name}; use --method gptq, awq or rtn")
            linears = linear_names(path, trc)
            skip = skip_modules(linears, job.scheme)
            if len(skip) == len(linears):
                raise QuantkitError(f"--skip {','.join(job.scheme.skip)} leaves no Linear to quantize; narrow it")
            config = self.bnb_config(opts, job.device, skip)
            log.info("%s: loading %s with bitsandbytes on %s (%d Linears skipped)", self.name, job.source.name,
                     job.device, len(skip))
            if job.progress:
                job.progress("quantize", 0, 1)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path, quantization_config=config, dtype=torch.float32, device_map={"": str(job.device)},
                    trust_remote_code=trc,
                )
            except (OSError, ValueError) as e:
                raise ModelSourceError(f"cannot load {job.source.name} with bitsandbytes: {str(e).splitlines()[0]}") from None
        model.eval()
        round_unquantized(model, job.save_dtype)
        n_quant = sum(1 for m in model.modules() if is_bnb_module(m))
        if job.progress:
            job.progress("quantize", 1, 1)
        extra = {
            **self.describe_options(opts, job.device),
            "skip": list(job.scheme.skip),
            "skipped_modules": skip,
            "quantized_modules": n_quant,
            "save_dtype": str(job.save_dtype).removeprefix("torch."),
            "bitsandbytes_version": bitsandbytes.__version__,
        }
        return BnbArtifact(model=model, tokenizer=tok, method=self.name, save_dtype=job.save_dtype, extra=extra)


class _FourBit(_Bitsandbytes):
    quant_type: ClassVar[str]
    scheme_bits = (4,)
    Options: ClassVar[type[BaseModel]] = FourBitOptions

    def bnb_config(self, opts: FourBitOptions, device: torch.device, skip: list[str]) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=opts.double_quant,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[resolve_compute_dtype(opts, device)],
            bnb_4bit_quant_storage=STORAGE_DTYPES[opts.quant_storage],
            llm_int8_skip_modules=skip,
        )

    def describe_options(self, opts: FourBitOptions, device: torch.device) -> dict[str, Any]:
        return {"options": opts.model_dump(mode="json"), "compute_dtype": resolve_compute_dtype(opts, device),
                "block_size": BLOCK_4BIT}


class NF4(_FourBit):
    name = "nf4"
    description = "bitsandbytes 4-bit NormalFloat, blocks of 64, double quant; no data"
    quant_type = "nf4"
    card_tags = ("4-bit", "bitsandbytes", "nf4")


class FP4(_FourBit):
    name = "fp4"
    description = "bitsandbytes 4-bit float (e2m1), blocks of 64, double quant; no data"
    quant_type = "fp4"
    card_tags = ("4-bit", "bitsandbytes", "fp4")


class INT8(_Bitsandbytes):
    name = "int8"
    description = "bitsandbytes LLM.int8: int8 rows + fp16 outlier columns; no data"
    scheme_bits = (8,)
    card_tags = ("8-bit", "bitsandbytes", "llm.int8")
    Options: ClassVar[type[BaseModel]] = Int8Options

    def bnb_config(self, opts: Int8Options, device: torch.device, skip: list[str]) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(opts.int8_threshold),
                                  llm_int8_skip_modules=skip)
