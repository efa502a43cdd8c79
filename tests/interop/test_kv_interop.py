"""compressed-tensors (0.19.0) reads quantkit's quantized KV cache: the kv_cache_scheme parses as the QuantizationArgs
llm-compressor writes for an FP8 cache; the `self_attn.k_scale` / `v_scale` tensors are exactly the parameters
compressed-tensors registers on the attention modules it quantizes a cache for (names, shape (1,)); and its
fake_quantize with that scheme and those scales gives quantkit's cache values bit for bit.

transformers 5.24's own load does not apply the cache scheme (compressed-tensors 0.19 recognises a cached attention
by a `past_key_value(s)` argument, which 5.24 renamed `cache`), so it reports the scales as unexpected; the
parameters are therefore registered here with compressed-tensors' initialize_qparams, as its apply step would.
vLLM reads them by name (`self_attn.k_scale` -> `self_attn.attn.k_scale`) and divides by them.

Runs in the interop environment (scripts/setup-interop.sh):
    .venv-interop/bin/python -m pytest tests/interop/test_kv_interop.py
and skips cleanly anywhere compressed-tensors cannot be imported.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.needs import require  # noqa: E402
require("compressed_tensors")

import quantkit
from quantkit.api import quantize
from quantkit.models.kvcache import K_SCALE, V_SCALE
from tests.tiny import llama_config, make_model

CASES = {"w8a8-rtn-kv": ("rtn", "w8a8"), "fp8-dynamic-rtn-kv": ("rtn", "fp8-dynamic"), "fp8-gptq-kv": ("gptq", "fp8")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, text_file):
    folder = make_model(tmp_path_factory.mktemp("kv") / "llama",
                        llama_config(hidden=128, inter=256, architectures=["LlamaForCausalLM"]))
    calib = {"dataset": str(text_file), "nsamples": 8, "seqlen": 32, "batch_size": 4}
    outs = {}
    for name, (method, preset) in CASES.items():
        from quantkit.scheme import make_scheme

        outs[name] = folder.parent / name
        quantize(folder, method, outs[name], scheme=make_scheme(preset, kv_cache="fp8"), calib=calib, device="cpu")
    return outs


@pytest.mark.parametrize("case", CASES)
def test_compressed_tensors_parses_the_kv_cache_scheme(checkpoints, case):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig

    qc = json.loads((checkpoints[case] / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    kv = config.kv_cache_scheme.model_dump(exclude={"observer", "observer_kwargs"})  # llm-compressor fills observers
    assert kv == QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False,
                                  symmetric=True).model_dump(exclude={"observer", "observer_kwargs"})
    assert config.requires_calibration_data()  # a static cache scheme: compressed-tensors' own reading


@pytest.mark.parametrize("case", CASES)
def test_scales_fill_the_parameters_compressed_tensors_registers(checkpoints, case):
    """Every attention module compressed-tensors quantizes a cache for gets its k_scale / v_scale parameters (shape
    and names from compressed-tensors' own initialize_qparams), and quantkit's tensors fill exactly those."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.initialize import _is_attention_module, initialize_qparams
    from compressed_tensors.quantization.quant_metadata import KVCacheScaleType
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = checkpoints[case]
    args = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"]
                                             ).kv_cache_scheme
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg = theirs.config
    attn = {n: m for n, m in theirs.named_modules() if _is_attention_module(m)}
    for mod in attn.values():
        for base in ("k", "v"):
            initialize_qparams(mod, base, args, observed_shape=(cfg.num_key_value_heads, None, cfg.head_dim),
                               observed_dtype=torch.float16, force_zero_point=False)
    registered = {f"{n}.{k.value}" for n in attn for k in (KVCacheScaleType.KEY, KVCacheScaleType.VALUE)}
    stored = {k: t for k, t in load_file(str(out / "model.safetensors")).items() if k.endswith(("k_scale", "v_scale"))}
    assert set(stored) == registered and len(registered) == 2 * cfg.num_hidden_layers
    result = theirs.load_state_dict(stored, strict=False)
    assert not result.unexpected_keys
    ours = quantkit.load(out)
    for name, t in stored.items():
        param = theirs.get_parameter(name)
        assert param.shape == t.shape == (1,)
        owner, key = name.rsplit(".", 1)
        assert torch.equal(param.float(), ours.get_submodule(owner).get_buffer(key)), name


@pytest.mark.parametrize("case", CASES)
def test_compressed_tensors_quantizes_keys_as_quantkit_does(checkpoints, case):
    """compressed-tensors' fake_quantize with the kv_cache_scheme and a stored scale gives quantkit's FP8 cache
    values bit for bit, on the post-RoPE keys and the values of a real forward (divide by the scale, e4m3, clamp)."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from quantkit.models.arch import get_arch, get_blocks
    from quantkit.models.kvcache import attention_modules, fake_quant, observing

    out = checkpoints[case]
    args = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"]
                                             ).kv_cache_scheme
    ours = quantkit.load(out).eval()
    attn = attention_modules(ours, get_blocks(ours, get_arch(ours)))
    seen = 0
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), observing(ours, attn) as amax:  # the float keys/values' range, per layer
        ours(ids)
    gen = torch.Generator().manual_seed(1)
    for name, mod in attn.items():
        for i, key in enumerate(("k_scale", "v_scale")):
            scale = mod.get_buffer(key)
            x = (torch.rand(1, 2, 24, 32, generator=gen) * 2 - 1) * float(amax[name][i]) * 1.2  # beyond the range too
            theirs = fake_quantize(x, scale, None, args)
            assert not torch.equal(theirs, x)
            assert torch.equal(theirs, fake_quant(x, scale)), (name, key)
            seen += 1
    assert seen == 2 * len(attn) == 4
