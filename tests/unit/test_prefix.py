"""Window prefixes (quantkit.calib.prefix): a causal block's first n outputs from the cut inputs, checked; a block
that mixes positions falls back to whole windows; SignRound tunes on prefixes deterministically."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantkit.api import quantize
from quantkit.calib.pipeline import _first, capture_inputs
from quantkit.calib.prefix import batch_inputs, cut_inputs, prefix_inputs
from quantkit.models.arch import get_arch, get_blocks
from quantkit.models.sources import load_model, resolve
from tests.tiny import gemma3_config, llama_config, make_gemma3, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("prefix") / "m", llama_config(hidden=64, inter=128))


def _block_inputs(path, seqlen=32, n=3):
    model, _ = load_model(resolve(str(path)), torch.float32)
    spec = get_arch(model)
    ids = torch.randint(5, 300, (n, seqlen), generator=torch.Generator().manual_seed(0))
    inp = capture_inputs(model, spec, ids, n, torch.device("cpu"))
    return get_blocks(model, spec), inp


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_cut_inputs_give_the_whole_windows_first_outputs(kind, tiny, tmp_path):
    path = tiny if kind == "llama" else make_gemma3(tmp_path / "g", gemma3_config(layers=2, hidden=64, inter=128,
                                                                                    vocab=320, sliding_window=8))
    blocks, inp = _block_inputs(path)
    x = torch.cat(inp.hidden)
    for i, block in enumerate(blocks):
        args, kwargs = inp.args, inp.kwargs_for(i)
        cut = prefix_inputs(block, x, args, kwargs, 12)
        assert cut is not None
        with torch.no_grad():
            full = _first(block(x, *args, **kwargs))[:, :12]
            part = _first(block(x[:, :12].contiguous(), *cut[0], **cut[1]))
        assert torch.allclose(part, full, rtol=1e-4, atol=1e-5)


def test_cut_slices_every_sequence_dimension_but_the_batch():
    seqlen = 10
    kwargs = {"pos": torch.zeros(1, seqlen, 4), "mask": torch.zeros(seqlen, 1, seqlen, seqlen),
              "cache_position": torch.arange(seqlen), "rope": (torch.zeros(1, seqlen, 4),), "flag": True}
    _, out = cut_inputs((), kwargs, seqlen, 3)
    assert out["pos"].shape == (1, 3, 4) and out["mask"].shape == (seqlen, 1, 3, 3)
    assert out["cache_position"].shape == (3,) and out["rope"][0].shape == (1, 3, 4) and out["flag"] is True


class _MixesPositions(nn.Module):
    """Not causal: every position sees the window's mean."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x + x.mean(dim=1, keepdim=True))


def test_a_block_that_is_not_causal_is_tuned_on_whole_windows(caplog):
    x = torch.randn(2, 16, 8)
    assert prefix_inputs(_MixesPositions(), x, (), {}, 8) is None
    assert "whole windows" in caplog.text
    assert prefix_inputs(_MixesPositions(), x, (), {}, 16) is None  # nothing to cut


def test_signround_on_window_prefixes_is_deterministic(tiny, text_file, tmp_path):
    kw = dict(scheme={"bits": 4, "group_size": 32}, device="cpu",
              calib={"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "batch_size": 2},
              options={"iters": 12, "lr": 0.1, "calib_dtype": "float32", "compile": "off", "window_tokens": 16})
    for name in ("a", "b"):
        quantize(tiny, "signround", tmp_path / name, **kw)
    whole = dict(kw, options={**kw["options"], "window_tokens": 0})
    quantize(tiny, "signround", tmp_path / "whole", **whole)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "whole" / "model.safetensors").read_bytes()  # the prefix was what it tuned on


def test_batch_inputs_turn_a_captured_mask_into_one_that_broadcasts():
    mask = torch.zeros(2, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    _, out = batch_inputs((), {"attention_mask": mask, "pos": torch.zeros(1, 6, 4)}, 3)
    assert out["attention_mask"].shape == (1, 1, 6, 6) and torch.equal(out["attention_mask"][0], mask[0])
    _, same = batch_inputs((), {"attention_mask": mask}, 2)
    assert same["attention_mask"] is mask
    mask[1, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match="differ"):
        batch_inputs((), {"attention_mask": mask}, 3)


def test_signround_with_a_sliding_window_mask_tunes_other_batch_sizes_and_prefixes(text_file, tmp_path):
    """Gemma 3 with a sliding window shorter than the windows: its blocks get real masks, captured for the
    pipeline's batch of 2; tuning steps of 3 windows, whole or cut to 16 tokens, run on them."""
    model = make_gemma3(tmp_path / "g", gemma3_config(layers=2, hidden=64, inter=128, sliding_window=8))
    for wt in (0, 16):
        quantize(model, "signround", tmp_path / f"o{wt}", scheme={"bits": 4, "group_size": 32}, device="cpu",
                 calib={"dataset": str(text_file), "nsamples": 6, "seqlen": 32, "batch_size": 2},
                 options={"iters": 3, "calib_dtype": "float32", "compile": "off", "windows_per_step": 3,
                          "window_tokens": wt})
        assert (tmp_path / f"o{wt}" / "model.safetensors").stat().st_size > 0
