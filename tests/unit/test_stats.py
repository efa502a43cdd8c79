"""checkpoint_stats: parameters, bytes and bits per quantized weight of any checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import quantkit
from quantkit.errors import CheckpointError
from quantkit.formats.stats import checkpoint_stats, tensor_entries
from tests.tiny import llama_config, make_model

HIDDEN, INTER, LAYERS, VOCAB = 128, 256, 2, 320
# (out_features, in_features) of the seven Linears of one decoder layer (4 heads, 2 kv heads)
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN // 2, HIDDEN), (HIDDEN // 2, HIDDEN), (HIDDEN, HIDDEN),
          (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]
LINEAR_WEIGHTS = LAYERS * sum(o * i for o, i in SHAPES)
PLAIN = VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN  # embeddings (lm_head tied) + RMSNorm weights


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("base"), llama_config(layers=LAYERS, hidden=HIDDEN, inter=INTER))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def test_float_model(base):
    s = checkpoint_stats(base)
    assert s["quant_method"] is None and s["bits_per_weight"] is None
    assert s["bits_per_weight_all"] == pytest.approx(32.0)  # every tensor float32
    assert (s["quantized_params"], s["quantized_modules"]) == (0, 0)
    assert s["total_params"] == PLAIN + LINEAR_WEIGHTS
    assert s["tensor_count"] == 1 + LAYERS * 9 + 1
    assert s["size_bytes"] == folder_bytes(base)


def test_gptq_bits_count_qzeros_scales_and_g_idx(base, tmp_path):
    out = tmp_path / "rtn"
    quantkit.quantize(base, "rtn", out, scheme="w4g64")
    s = checkpoint_stats(out)
    # per Linear: 4-bit codes, 4-bit zero + fp16 scale per 64 inputs and output, int32 g_idx per input
    bits = LAYERS * sum(o * i * 4 + (i // 64) * o * (4 + 16) + 32 * i for o, i in SHAPES)
    assert s["quant_method"] == "gptq"
    assert s["quantized_params"] == LINEAR_WEIGHTS
    assert s["bits_per_weight"] == pytest.approx(bits / LINEAR_WEIGHTS)
    assert s["total_params"] == PLAIN + LINEAR_WEIGHTS
    # over all weights: the plain tensors (embedding, norms, lm_head) count at the width they are stored in
    plain_bits = sum(e.nbytes * 8 for k, e in tensor_entries(out).items() if not k.endswith(
        (".qweight", ".qzeros", ".scales", ".g_idx")))
    assert s["bits_per_weight_all"] == pytest.approx((bits + plain_bits) / (PLAIN + LINEAR_WEIGHTS))
    assert s["quantized_modules"] == 7 * LAYERS
    assert s["size_bytes"] == folder_bytes(out)


def write_checkpoint(folder: Path, qc: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_awq_layout_counts_the_same_way(tmp_path):
    # AWQ GEMM: qweight (in, out*bits/32), qzeros (in/g, out*bits/32), scales (in/g, out) fp16
    i, o, g = 256, 128, 128
    tensors = {"l.qweight": torch.zeros(i, o // 8, dtype=torch.int32),
               "l.qzeros": torch.zeros(i // g, o // 8, dtype=torch.int32),
               "l.scales": torch.zeros(i // g, o, dtype=torch.float16),
               "l.bias": torch.zeros(o, dtype=torch.float16)}
    s = checkpoint_stats(write_checkpoint(tmp_path / "awq", {"quant_method": "awq", "bits": 4, "group_size": g},
                                         tensors))
    assert s["quantized_params"] == i * o
    assert s["bits_per_weight"] == pytest.approx(4 + (4 + 16) / g)
    assert s["total_params"] == i * o + o  # the bias is a parameter, not overhead


def test_bnb_int8_counts_row_scales(tmp_path):
    o, i = 64, 256
    tensors = {"l.weight": torch.zeros(o, i, dtype=torch.int8), "l.SCB": torch.zeros(o),
               "l.weight_format": torch.zeros((), dtype=torch.uint8), "n.weight": torch.zeros(i)}
    s = checkpoint_stats(write_checkpoint(tmp_path / "int8", {"quant_method": "bitsandbytes"}, tensors))
    assert s["quantized_params"] == o * i and s["quantized_modules"] == 1
    assert s["bits_per_weight"] == pytest.approx(8 + (32 * o + 8) / (o * i))
    assert s["total_params"] == o * i + i


def test_packed_without_bits_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "bad", {"quant_method": "gptq"},
                              {"l.qweight": torch.zeros(8, 8, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match="no integer 'bits'"):
        checkpoint_stats(folder)
