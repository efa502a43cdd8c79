"""Tiny random models and a tiny tokenizer, built from configs (no hub, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights to a small integer grid. "
    "A language model predicts the next token from the previous ones. Paris is the capital of France. "
    "Water boils at one hundred degrees Celsius at sea level. The mitochondria is the powerhouse of the cell. "
) * 40


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def llama_config(layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 320, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, **kw)


def make_model(folder: Path, config=None, seed: int = 0) -> Path:
    """Save a random model of `config` (tiny Llama by default) with the tiny tokenizer into `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = config or llama_config()
    if not getattr(config, "architectures", None):
        config.architectures = [config.model_type.capitalize() + "ForCausalLM"]
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_text(path: Path) -> Path:
    path.write_text(TEXT)
    return path


def assert_quantize_refused(model: Path, out: Path, args: list[str], needle: str) -> None:
    """`quantkit quantize MODEL -o OUT ARGS` is refused: exit 2, one stderr line holding `needle`, no output."""
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    r = CliRunner().invoke(app, ["quantize", str(model), "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists()
