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


def spm_bpe_tokenizer():
    """A Gemma-3-style tokenizer: " " normalized to "\u2581", BPE over the whole text, byte fallback to <0xXX>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=200, show_progress=False))
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in
              __import__("json").loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos>:1 $B:1",
                                                      special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def gemma3_config(layers: int = 3, hidden: int = 256, inter: int = 512, vocab: int = 512, **kw):
    """Tiny Gemma 3: GQA 4/2, head_dim 64 (query_pre_attn_scalar to match, as llama.cpp assumes), a sliding window of 8
    on layers 0 and 2 with layer 1 global (not llama.cpp's default period-6 pattern), two rope bases."""
    from transformers import Gemma3TextConfig

    args = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                max_position_embeddings=512, sliding_window=8,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                architectures=["Gemma3ForCausalLM"])
    return Gemma3TextConfig(**{**args, **kw})


def make_gemma3(folder: Path, config=None, seed: int = 0) -> Path:
    """A random tiny Gemma 3 with the SPM-style tokenizer; its norms (zeros at init) made random so that 1 + w matters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or gemma3_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    spm_bpe_tokenizer().save_pretrained(folder)
    return folder


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
