"""Is llm-compressor's SmoothQuant an identity on Gemma 3, before any rounding? (a check, not a test; .venv-llmc)

SmoothQuant divides a norm's output channels by s and multiplies the next Linears' input channels by s, which
leaves the model's function unchanged only when that norm feeds exactly those Linears. On Gemma 2/3 the MLP's
input norm is `pre_feedforward_layernorm`; `post_attention_layernorm` normalizes the attention output before the
residual add. llm-compressor 0.14.0.1 maps Gemma3ForCausalLM to its Llama default (post_attention_layernorm ->
gate/up). This runs SmoothQuantModifier(0.8) alone (no quantization) on a tiny random Gemma 3 (one outlier
channel in a norm) with the registry's mappings and with explicit pre_feedforward_layernorm mappings, and logs
the largest logit change against the float model: a correct smoothing changes nothing beyond float rounding.

    .venv-llmc/bin/python benchmarks/peers/llmc_sq_identity.py
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench.llmc-sq")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    import transformers as tf
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    sys.path.insert(0, str(ROOT))
    from benchmarks.peers.llmc_w8a8 import PRE_FFN_MAPPINGS
    from tests.tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                              max_position_embeddings=512, architectures=["Gemma3ForCausalLM"])
    model = tf.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
        model.model.layers[0].input_layernorm.weight[3] = 8.0  # an outlier channel
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok = tiny_tokenizer()
        tok.save_pretrained(tmp)
        base = tf.Gemma3ForCausalLM.from_pretrained(tmp).eval()
        with torch.no_grad():
            ref = base(ids).logits
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 32] * 4})
        for label, mappings in (("registry (Llama default)", None),
                                ("input_layernorm + pre_feedforward_layernorm", PRE_FFN_MAPPINGS)):
            m = copy.deepcopy(base)
            oneshot(model=m, dataset=data, tokenizer=tok, num_calibration_samples=4, max_seq_length=32,
                    shuffle_calibration_samples=False,
                    recipe=[SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings)])
            with torch.no_grad():
                diff = float((m(ids).logits - ref).abs().max())
            log.info("SmoothQuant mappings %s: max |logits - float logits| = %.3e (largest float logit %.2f)",
                     label, diff, float(ref.abs().max()))


if __name__ == "__main__":
    main()
