"""nf4 / fp4 / int8 through bitsandbytes on a tiny random Llama: save, reload, sizes, options."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

import quantkit  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.formats.bnb import is_bnb_module  # noqa: E402
from quantkit.formats.stats import checkpoint_stats  # noqa: E402
from quantkit.methods.base import QuantJob  # noqa: E402
from quantkit.methods.bnb.run import resolve_compute_dtype, stored_as  # noqa: E402
from quantkit.models.sources import resolve  # noqa: E402
from quantkit.registry import get_method, list_methods  # noqa: E402
from quantkit.scheme import make_scheme  # noqa: E402
from tests.tiny import llama_config, make_model  # noqa: E402

METHODS = ["nf4", "fp4", "int8"]
HIDDEN, INTER, LAYERS, VOCAB = 128, 256, 2, 320


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("base"), llama_config(layers=LAYERS, hidden=HIDDEN, inter=INTER))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def quantize(base: Path, method: str, out: Path, save_dtype: torch.dtype = torch.float16, skip=None, **options):
    """Run the method as the API does and keep the in-memory model: (artifact, folder)."""
    impl = get_method(method)
    scheme = make_scheme(None, skip=skip)
    job = QuantJob(source=resolve(base), scheme=scheme, options=impl.Options(**options), save_dtype=save_dtype)
    artifact = impl.quantize(job)
    out.mkdir()
    artifact.save(out)
    return artifact, out


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def bnb_reference(base: Path, method: str):
    """The base loaded straight through transformers with the BitsAndBytesConfig quantkit uses."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, dtype=torch.float32,
                                                device_map="cpu").eval()


@pytest.mark.parametrize("method", METHODS)
def test_reload_reproduces_in_memory_logits(base, ids, tmp_path, method):
    from transformers import AutoModelForCausalLM

    artifact, out = quantize(base, method, tmp_path / "q")
    assert sum(is_bnb_module(m) for m in artifact.model.modules()) == 7 * LAYERS
    via_quantkit = quantkit.load(out)  # non-quantized tensors in fp32, like the in-memory model
    assert torch.equal(logits(via_quantkit, ids), logits(artifact.model, ids))
    # transformers keeps the stored fp16 for them (it ignores dtype= for pre-quantized checkpoints):
    # the same model computing its embeddings and norms in fp16.
    via_hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    assert via_hf.model.embed_tokens.weight.dtype == torch.float16
    with stored_as(artifact.model, torch.float16):
        assert torch.equal(logits(via_hf, ids), logits(artifact.model, ids))
    assert isinstance(via_quantkit.lm_head, nn.Linear) and not is_bnb_module(via_quantkit.lm_head)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert resolve(out).is_quantized


@pytest.mark.parametrize("method", METHODS)
def test_fp32_checkpoint_equals_direct_bitsandbytes_load(base, ids, tmp_path, method):
    _, out = quantize(base, method, tmp_path / "q", save_dtype=torch.float32)
    assert torch.equal(logits(quantkit.load(out), ids), logits(bnb_reference(base, method), ids))


def expected_quantized_bytes(method: str, out_f: int, in_f: int, blob: int) -> int:
    """Bytes bitsandbytes stores for one (out_f, in_f) Linear, from its documented layout."""
    n = out_f * in_f
    if method == "int8":
        return n + 4 * out_f + 1                      # int8 codes, fp32 row scale, weight_format byte
    blocks = math.ceil(n / 64)
    return (n // 2 + blocks                           # 4-bit codes, uint8 absmax per 64 (double quant)
            + 4 * math.ceil(blocks / 256) + 4 * 256   # fp32 absmax per 256 blocks, fp32 nested code table
            + 4 * 16 + blob)                          # fp32 4-bit code table, JSON quant_state blob


@pytest.mark.parametrize("method", METHODS)
def test_size_on_disk_matches_the_layout(base, tmp_path, method):
    _, out = quantize(base, method, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        blobs = {k.split(".weight.quant_state")[0]: fh.get_tensor(k).numel()
                 for k in fh.keys() if ".quant_state." in k}
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN // 2, HIDDEN), "v_proj": (HIDDEN // 2, HIDDEN),
              "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
              "down_proj": (HIDDEN, INTER)}
    quant_bytes = quant_weights = 0
    for layer in range(LAYERS):
        for leaf, (o, i) in shapes.items():
            group = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{layer}.{group}.{leaf}"
            quant_bytes += expected_quantized_bytes(method, o, i, blobs.get(name, 0))
            quant_weights += o * i
    plain = VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN   # embeddings (tied lm_head) and norms, fp16
    fp16_bytes = 2 * (plain + quant_weights)
    expected = 2 * plain + quant_bytes
    raw = (out / "model.safetensors").read_bytes()
    data = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # file = u64 header length, JSON header, data
    assert data == expected
    # 4-bit codes + absmax + per-Linear tables (1.3 KB each, large next to these 8-32k-weight Linears)
    assert data / fp16_bytes < (0.40 if method != "int8" else 0.60)
    stats = checkpoint_stats(out)
    assert stats["quantized_params"] == quant_weights
    assert stats["bits_per_weight"] == pytest.approx(8 * quant_bytes / quant_weights)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(base, tmp_path, method):
    _, a = quantize(base, method, tmp_path / "a")
    _, b = quantize(base, method, tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_options_and_quant_storage_round_trip(base, ids, tmp_path):
    artifact, out = quantize(base, "nf4", tmp_path / "q", double_quant=False, compute_dtype="bfloat16",
                             quant_storage="bf16")
    from quantkit.models.sources import read_config

    qc = read_config(out)["quantization_config"]
    assert (qc["bnb_4bit_use_double_quant"], qc["bnb_4bit_compute_dtype"], qc["bnb_4bit_quant_storage"]) == (
        False, "bfloat16", "bfloat16")
    assert torch.equal(logits(quantkit.load(out), ids), logits(artifact.model, ids))
    # Without double quant every absmax is fp32: 4 + 32/64 bits per weight plus per-layer tables.
    assert 4.5 < checkpoint_stats(out)["bits_per_weight"] < 4.5 + 0.2


def test_int8_threshold_is_recorded(base, tmp_path):
    _, out = quantize(base, "int8", tmp_path / "q", int8_threshold=0.0)
    from quantkit.models.sources import read_config

    assert read_config(out)["quantization_config"]["llm_int8_threshold"] == 0.0


def test_skip_patterns_expand_to_exact_names(base, tmp_path):
    _, out = quantize(base, "nf4", tmp_path / "q", skip=["lm_head", "*down_proj"])
    model = quantkit.load(out)
    for layer in model.model.layers:
        assert not is_bnb_module(layer.mlp.down_proj) and is_bnb_module(layer.mlp.up_proj)
    assert checkpoint_stats(out)["quantized_modules"] == 6 * LAYERS


def test_skipping_every_linear_is_refused(base, tmp_path):
    with pytest.raises(QuantkitError, match="leaves no Linear"):
        quantize(base, "fp4", tmp_path / "q", skip=["*"])


@pytest.mark.parametrize(("method", "options", "match"), [
    ("int8", {"double_quant": True}, "double quantization applies to the 4-bit methods"),
    ("int8", {"double_quant": False}, "remove --double-quant"),
    ("int8", {"compute_dtype": "bf16"}, "int8 has no compute dtype"),
    ("int8", {"quant_storage": "uint8"}, "quant_storage applies to the 4-bit"),
    ("int8", {"int8_threshold": -1.0}, "int8_threshold must be >= 0"),
    ("nf4", {"compute_dtype": "int4"}, "compute_dtype 'int4' is not valid for nf4/fp4; choose one of"),
    ("fp4", {"quant_storage": "int32"}, "quant_storage 'int32' is not valid"),
    ("nf4", {"int8_threshold": 6.0}, "int8_threshold applies to the int8 method only"),
    ("nf4", {"group": 64}, "unknown option 'group' for nf4/fp4; its options are: double_quant"),
    ("nf4", {"double_quant": "maybe"}, "nf4/fp4 option double_quant"),
])
def test_bad_options_are_one_line_errors(method, options, match):
    with pytest.raises(QuantkitError, match=match) as err:
        get_method(method).Options(**options)
    assert "\n" not in str(err.value)


def test_bad_options_fail_before_any_work(base, tmp_path):
    with pytest.raises(QuantkitError, match="double quantization"):
        quantkit.quantize(base, "int8", tmp_path / "q", options={"double_quant": True})
    assert not (tmp_path / "q").exists()


def test_dtype_spellings_and_defaults():
    opts = get_method("nf4").Options(compute_dtype="float16")
    assert opts.compute_dtype == "fp16"
    default = get_method("nf4").Options()
    assert default.double_quant and default.quant_storage == "uint8"
    assert resolve_compute_dtype(default, torch.device("cpu")) == "fp32"
    assert resolve_compute_dtype(default, torch.device("cuda")) == "bf16"
    assert get_method("int8").Options().int8_threshold == 6.0


def test_listed_without_calibration():
    infos = {i.name: i for i in list_methods()}
    for name in METHODS:
        assert not infos[name].needs_calibration and infos[name].formats == ("bitsandbytes",)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_public_api_writes_one_or_several_shards(base, ids, tmp_path, method):
    """quantkit.quantize passes --max-shard-size to every artifact, the bitsandbytes one included."""
    one = quantkit.quantize(base, method, tmp_path / "one", device="cpu")
    many = quantkit.quantize(base, method, tmp_path / "many", device="cpu", max_shard_size="100KB")
    names_one = {f.name for f in Path(one["out"]).iterdir()}
    names_many = {f.name for f in Path(many["out"]).iterdir()}
    assert "model.safetensors" in names_one
    assert "model.safetensors.index.json" in names_many
    assert len([n for n in names_many if n.startswith("model-")]) > 1
    a, b = quantkit.load(one["out"]), quantkit.load(many["out"])
    assert torch.equal(logits(a, ids), logits(b, ids))
