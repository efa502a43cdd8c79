"""nf4 / int8 on smollm2-135m: the saved checkpoint is bitsandbytes itself, and as small as promised."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

import quantkit  # noqa: E402
from quantkit.calib import data  # noqa: E402
from quantkit.eval.quality import evaluate  # noqa: E402
from quantkit.formats.stats import checkpoint_stats  # noqa: E402
from quantkit.models.sources import _load_tokenizer, resolve  # noqa: E402

MODEL = "smollm2-135m"


@pytest.mark.slow
def test_nf4_checkpoint_ppl_equals_direct_bitsandbytes_load(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "nf4"
    # fp32 storage: nothing but bitsandbytes' own rounding separates the checkpoint from the base
    quantkit.quantize(MODEL, "nf4", out, save_dtype="float32", device="cpu")
    folder = resolve(MODEL).path
    direct = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                               llm_int8_skip_modules=["lm_head"]),
    ).eval()
    windows = data.test_windows(_load_tokenizer(folder, False), seqlen=128, max_windows=2)
    ours, theirs = evaluate([quantkit.load(out), direct], windows)
    assert ours.ppl == theirs.ppl
    assert 1.0 < ours.ppl < 100.0
    stats = checkpoint_stats(out)
    assert stats["quantized_modules"] == 7 * 30
    assert stats["bits_per_weight"] <= 4.6


@pytest.mark.slow
def test_int8_bits_per_weight(tmp_path):
    out = tmp_path / "int8"
    quantkit.quantize(MODEL, "int8", out, device="cpu")
    stats = checkpoint_stats(out)
    assert stats["quant_method"] == "bitsandbytes" and stats["quantized_modules"] == 7 * 30
    assert 8.0 < stats["bits_per_weight"] <= 8.6
