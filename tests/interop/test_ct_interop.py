"""compressed-tensors (0.19.0, through transformers) loads quantkit's compressed-tensors checkpoints and computes
what quantkit.load does: W8A8 and FP8 (int-/float-quantized, activations quantized in both forwards) and the
W4A16 pack-quantized writer (`quantkit convert --to compressed-tensors`).

Runs in the interop environment (scripts/setup-interop.sh):
    .venv-interop/bin/python -m pytest tests/interop/test_ct_interop.py
and skips cleanly anywhere compressed-tensors cannot be imported.

Every checkpoint's weights are decompressed by compressed-tensors' own compressor for its format; transformers
(5.24, with compressed-tensors 0.19) loads all but the asymmetric pack-quantized one, whose packed zero points it
refuses as a size mismatch (llm-compressor's own asymmetric checkpoints fail the same way).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.needs import require  # noqa: E402
require("compressed_tensors")

import quantkit
from quantkit.api import quantize
from quantkit.convert import convert
from quantkit.formats.qlinear import QuantLinear
from tests.tiny import llama_config, make_model

W8A8 = {  # name -> (method, preset)
    "w8a8-rtn": ("rtn", "w8a8"),
    "w8a8-gptq": ("gptq", "w8a8"),
    "w8a8-static-gptq": ("gptq", "w8a8-static"),
    "fp8-dynamic-rtn": ("rtn", "fp8-dynamic"),
    "fp8-dynamic-gptq": ("gptq", "fp8-dynamic"),
    "fp8-gptq": ("gptq", "fp8"),
}
W4A16 = {"w4g32-sym": {"bits": 4, "group_size": 32, "sym": True},
         "w4g32-asym": {"bits": 4, "group_size": 32, "sym": False}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, text_file):
    folder = make_model(tmp_path_factory.mktemp("ct") / "llama",
                        llama_config(hidden=128, inter=256, architectures=["LlamaForCausalLM"]))
    calib = {"dataset": str(text_file), "nsamples": 8, "seqlen": 32, "batch_size": 4}
    outs = {}
    for name, (method, preset) in W8A8.items():
        outs[name] = folder.parent / name
        quantize(folder, method, outs[name], scheme=preset, calib=calib, device="cpu")
    for name, scheme in W4A16.items():
        gptq = folder.parent / f"gptq-{name}"
        quantize(folder, "gptq", gptq, scheme=scheme, calib=calib, device="cpu")
        outs[name] = folder.parent / name
        convert(gptq, "compressed-tensors", outs[name])
    return outs


def _ids():
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def ct_decompressed(out) -> dict[str, torch.Tensor]:
    """Every quantized Linear's weight as compressed-tensors' own compressor for the checkpoint's format
    decompresses it (its config parsed by compressed-tensors), by module name."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors = load_file(str(out / "model.safetensors"))
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    out_w = {}
    for name in modules:
        local = {k.removeprefix(name + "."): t for k, t in tensors.items() if k.startswith(name + ".")
                 and "." not in k.removeprefix(name + ".")}
        out_w[name] = compressor.decompress(local, scheme)["weight"]  # in the stored scales' dtype (fp16)
    return out_w


@pytest.mark.parametrize("case", [*W8A8, *W4A16])
def test_compressed_tensors_decompresses_quantkit_weights(checkpoints, case):
    out = checkpoints[case]
    ours = quantkit.load(out).eval()
    theirs = ct_decompressed(out)
    mods = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert set(theirs) == set(mods) and len(mods) == 14
    for name, mod in mods.items():  # s * q is exact in float32, so both round it to fp16 once
        assert torch.equal(theirs[name], mod.dequantize(torch.float32).to(theirs[name].dtype)), name


@pytest.mark.parametrize("case", [*W8A8, "w4g32-sym"])  # asymmetric pack-quantized: see the module docstring
def test_transformers_matches_quantkit_load(checkpoints, case):
    from transformers import AutoModelForCausalLM

    out = checkpoints[case]
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = quantkit.load(out).eval()
    ids = _ids()
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits  # their first forward decompresses the weights
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())
    for name, mod in ours.named_modules():  # what they computed with: exactly quantkit's weights
        if isinstance(mod, QuantLinear):
            assert torch.equal(theirs.get_submodule(name).weight.detach().float(), mod.dequantize(torch.float32))
    if case in W8A8:  # their forward quantizes the activations as quantkit's does: without it, logits differ
        for mod in ours.modules():
            if isinstance(mod, QuantLinear):
                mod.act = None
        with torch.no_grad():
            assert float((theirs(ids).logits - ours(ids).logits).abs().max()) > 1e-4


def write_as_llm_compressor(src, out, preset: str) -> None:
    """A checkpoint written by compressed-tensors itself, the way llm-compressor saves one: the preset's scheme
    applied to every Linear but lm_head, min/max weight scales (compressed-tensors' own calculate_qparams), a
    static input scale where the preset has one, then its ModelCompressor compresses and saves."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config)
    for mod in model.modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is None:
            continue
        w = mod.weight.data
        dims = {} if scheme.weights.strategy == "tensor" else {"dim": 1, "keepdim": True}
        scale, _ = calculate_qparams(w.amin(**dims).reshape(-1, 1), w.amax(**dims).reshape(-1, 1), scheme.weights)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            mod.input_scale.data.fill_(0.05)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)


@pytest.mark.parametrize("preset", ["W8A8", "FP8_DYNAMIC", "FP8"])
def test_quantkit_loads_compressed_tensors_own_checkpoints(tmp_path, preset):
    """What llm-compressor writes (int-quantized / float-quantized with input_activations), quantkit.load reads and
    computes as transformers does, activation quantization included."""
    from transformers import AutoModelForCausalLM

    src = make_model(tmp_path / "llama", llama_config(hidden=128, inter=256, architectures=["LlamaForCausalLM"]))
    out = tmp_path / preset
    write_as_llm_compressor(src, out, preset)
    ours = quantkit.load(out).eval()
    lin = ours.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(lin, QuantLinear) and lin.act is not None
    assert lin.act.dynamic == (preset != "FP8") and lin.act.type == ("int" if preset == "W8A8" else "float")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())
