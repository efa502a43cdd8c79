"""Checkpoint formats of weight-only quantized models: their config.json entry and tensor layout.

A format is data: how to write `quantization_config` for a scheme, how to
recognise it when reading, and which `Layout` packs its tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from quantkit.errors import CheckpointError
from quantkit.formats.awq import AWQFormat
from quantkit.formats.compressed_tensors import CTFormat
from quantkit.formats.dynamic import dynamic_config
from quantkit.formats.layouts import GPTQLayout, Layout
from quantkit.scheme import QuantScheme
from quantkit.version import __version__


class Format(Protocol):
    name: ClassVar[str]

    def quantization_config(self, scheme: QuantScheme, extra: dict[str, Any]) -> dict[str, Any]: ...
    def matches(self, qc: dict[str, Any]) -> bool: ...
    def read(self, qc: dict[str, Any]) -> tuple[Layout, QuantScheme]: ...
    def side_files(self, qc: dict[str, Any]) -> dict[str, dict[str, Any]]: ...


class GPTQFormat:
    """AutoGPTQ's format, as transformers/optimum, vLLM, SGLang and TGI load it."""

    name: ClassVar[str] = "gptq"

    def quantization_config(self, scheme: QuantScheme, extra: dict[str, Any]) -> dict[str, Any]:
        qc = {
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "desc_act": scheme.desc_act,
            "sym": scheme.sym,
            "static_groups": scheme.static_groups,
            "true_sequential": bool(extra.get("true_sequential", True)),
            "damp_percent": float(extra.get("damp_percent", 0.01)),
            "checkpoint_format": "gptq",
            "lm_head": False,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"quantkit:{__version__}"]},
        }
        dynamic = dynamic_config(scheme)
        if dynamic:  # per-module grids (GPTQModel's `dynamic`: gptqmodel, transformers and vLLM read it)
            qc["dynamic"] = dynamic
        return qc

    def matches(self, qc: dict[str, Any]) -> bool:
        return qc.get("quant_method") == "gptq"

    def read(self, qc: dict[str, Any]) -> tuple[Layout, QuantScheme]:
        version = {"gptq": 1, "gptq_v2": 2}.get(qc.get("checkpoint_format", "gptq"))
        if version is None:
            raise CheckpointError(f"unsupported GPTQ checkpoint_format {qc.get('checkpoint_format')!r}")
        try:
            scheme = QuantScheme(bits=qc["bits"], group_size=qc["group_size"], sym=qc.get("sym", True),
                                 desc_act=qc.get("desc_act", False), static_groups=qc.get("static_groups", False))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"malformed GPTQ quantization_config: {e}") from None
        return GPTQLayout(version), scheme

    def side_files(self, qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """AutoGPTQ also reads quantize_config.json."""
        keys = ("bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential",
                "damp_percent", "checkpoint_format", "quant_method")
        side = {k: qc[k] for k in keys}
        if qc.get("dynamic"):  # gptqmodel reads this file before config.json
            side["dynamic"] = qc["dynamic"]
        return {"quantize_config.json": side}


FORMATS: dict[str, Format] = {"gptq": GPTQFormat(), "awq": AWQFormat(), "compressed-tensors": CTFormat()}


def get_format(name: str) -> Format:
    return FORMATS[name]


def detect_format(qc: dict[str, Any]) -> Format | None:
    return next((f for f in FORMATS.values() if f.matches(qc)), None)
