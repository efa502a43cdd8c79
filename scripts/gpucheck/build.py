"""What the check runs on: its size profiles, a text corpus from the tree, an offline tokenizer and random Llamas.

Nothing here reaches a hub: the tokenizer is a byte-level BPE trained on the corpus, the models are
random weights from a config, saved as safetensors.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("gpucheck.build")

ROOT = Path(__file__).resolve().parents[2]
CORPUS_FILES = ("README.md", "recipes/*.md", "benchmarks/results/*.md")


@dataclass(frozen=True)
class Profile:
    """Sizes of one run: the random Llama, calibration, evaluation and the speed runs."""

    name: str
    llama: dict                      # LlamaConfig fields of the random model
    tokenizer_vocab: int             # BPE vocabulary trained on the corpus (<= llama vocab_size)
    preset: str = "w4g128"
    nsamples: int = 32
    seqlen: int = 512
    calib_batch: int = 8
    eval_seqlen: int = 512
    eval_windows: int = 8
    prompt_len: int = 128
    gen_tokens: int = 32
    speed_batch: int = 8
    repeats: int = 2
    logit_tokens: int = 64           # prompt length of the kernel-vs-reference logit check
    methods: tuple[str, ...] = ("rtn", "gptq", "awq")
    extra: dict = field(default_factory=dict)


# ~1B-shaped (TinyLlama 1.1B: hidden 2048, MLP 5632, 32 heads, 4 KV heads, 22 layers, vocab 32000)
GPU = Profile(
    name="llama-1b",
    llama=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True),
    tokenizer_vocab=8000,
)

# the same steps in seconds on a CPU: a two-layer Llama whose Linears every CPU kernel accepts at w4g128
DRY = Profile(
    name="llama-tiny",
    llama=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True),
    tokenizer_vocab=400, nsamples=4, seqlen=64, calib_batch=4, eval_seqlen=64, eval_windows=4, prompt_len=16,
    gen_tokens=8, speed_batch=2, repeats=1, logit_tokens=16,
)


def corpus_text() -> str:
    """The tree's own Markdown (README, recipes, benchmark results), in a fixed order: real English, offline."""
    files = sorted({p for pattern in CORPUS_FILES for p in ROOT.glob(pattern) if p.is_file()})
    if not files:
        raise RuntimeError(f"no Markdown found under {ROOT} for the corpus")
    return "\n\n".join(p.read_text(encoding="utf-8") for p in files)


def write_corpus(path: Path) -> Path:
    path.write_text(corpus_text(), encoding="utf-8")
    return path


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE tokenizer trained on `text` (no download), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def llama_config(profile: Profile):
    from transformers import LlamaConfig

    return LlamaConfig(**profile.llama, architectures=["LlamaForCausalLM"])


def build_llama(folder: Path, profile: Profile, text: str, device: torch.device, seed: int = 0) -> Path:
    """A random Llama of `profile` (float16, initialised on `device`) and a tokenizer trained on `text`."""
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(text, profile.tokenizer_vocab)
    if len(tokenizer) > profile.llama["vocab_size"]:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, the model {profile.llama['vocab_size']}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(profile))
    model = model.to(torch.float16).eval()
    n = sum(p.numel() for p in model.parameters())
    log.info("%s: %.3f B parameters, random (seed %d), float16", profile.name, n / 1e9, seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(folder)
    return folder


def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """(out, in) of the quantized Linears of one decoder block of a Llama-like config.json (q/o, k/v, gate/up, down)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    shapes = [(heads * head_dim, hidden), (hidden, heads * head_dim), (kv * head_dim, hidden),
              (inter, hidden), (hidden, inter)]
    return list(dict.fromkeys(shapes))


def preset_for(shapes: list[tuple[int, int]], preferred: str) -> str:
    """`preferred` (w4gN) where N divides every Linear's inputs, else the largest of w4g128/64/32 that does
    (smollm2-135m's 576-wide inputs take w4g64)."""
    groups = [int(preferred.split("g")[1])] + [128, 64, 32]
    group = next((g for g in groups if all(i % g == 0 for _, i in shapes)), None)
    if group is None:
        raise RuntimeError(f"no 4-bit group size of 128, 64 or 32 divides the inputs of {shapes}")
    return f"w4g{group}"
