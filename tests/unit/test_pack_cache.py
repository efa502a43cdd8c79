"""The packed-weight cache: a later load reads the kernels' packed buffers instead of packing again."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

import quantkit
from quantkit.api import quantize
from quantkit.kernels import kernels_used
from quantkit.kernels.cache import evict, wait_for_writes

SCHEMES = {"w4": {"bits": 4, "group_size": 32}, "w4act": {"bits": 4, "group_size": 32, "desc_act": True},
           "w8": "w8", "w8g32": {"bits": 8, "group_size": 32}}


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("pack-cache")
    for name, scheme in SCHEMES.items():
        quantize(tiny_llama, "rtn", root / name, scheme=scheme, device="cpu")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "packed"
    monkeypatch.setenv("QUANTKIT_PACK_CACHE_DIR", str(root))
    monkeypatch.delenv("QUANTKIT_PACK_CACHE", raising=False)
    return root


def load(path, **kw):
    """quantkit.load, then the end of its background cache write (so the entry's presence can be checked)."""
    model = quantkit.load(path, **kw)
    wait_for_writes()
    return model


def _logits(model):
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def _entries(root):
    return sorted(root.glob("*.safetensors"))


@pytest.mark.parametrize("ck", list(SCHEMES))
def test_a_cached_load_is_the_packed_model(checkpoints, cache, caplog, ck):
    packed = load(checkpoints / ck, kernel="auto")
    assert len(_entries(cache)) == 1
    with caplog.at_level(logging.INFO, logger="quantkit"):
        cached = load(checkpoints / ck, kernel="auto")
    assert "read from the cache" in caplog.text
    assert kernels_used(cached) == kernels_used(packed) != {"reference": 14}
    for (name, a), (name_b, b) in zip(packed.state_dict().items(), cached.state_dict().items(), strict=True):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    for (_, a), (_, b) in zip(packed.named_modules(), cached.named_modules(), strict=True):
        for attr in getattr(a, "cached_attrs", ()):
            assert getattr(a, attr) == getattr(b, attr)
    assert torch.equal(_logits(packed), _logits(cached))


def test_the_key_follows_the_checkpoint_kernel_and_dtype(checkpoints, cache, tmp_path):
    ck = shutil.copytree(checkpoints / "w4", tmp_path / "w4")
    load(ck, kernel="auto")
    load(ck, kernel="cpu-int4")                      # another request, another entry
    load(ck, kernel="auto", dtype=torch.bfloat16)    # bias and compute follow the dtype
    assert len(_entries(cache)) == 3
    load(ck, kernel="auto")
    assert len(_entries(cache)) == 3                          # a hit writes nothing
    weights = ck / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint was rewritten
    load(ck, kernel="auto")
    assert len(_entries(cache)) == 4


def test_reference_dense_and_off_write_nothing(checkpoints, cache, monkeypatch):
    load(checkpoints / "w4")
    load(checkpoints / "w4", kernel="dense")
    load(checkpoints / "w4", kernel="auto", pack_cache=False)
    monkeypatch.setenv("QUANTKIT_PACK_CACHE", "0")
    load(checkpoints / "w4", kernel="auto")
    assert _entries(cache) == []


def test_an_unreadable_entry_is_replaced(checkpoints, cache, caplog):
    want = _logits(load(checkpoints / "w8", kernel="auto"))
    (entry,) = _entries(cache)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])   # truncated
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        again = load(checkpoints / "w8", kernel="auto")
    assert "unreadable" in caplog.text
    assert torch.equal(_logits(again), want)
    assert entry.is_file() and entry.stat().st_size > 0                   # packed and written again
    assert torch.equal(_logits(load(checkpoints / "w8", kernel="auto")), want)


def test_an_unwritable_cache_only_warns(checkpoints, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QUANTKIT_PACK_CACHE_DIR", str(blocker / "packed"))
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        model = load(checkpoints / "w4", kernel="auto")
    assert "not cached" in caplog.text
    assert kernels_used(model) == {"cpu-int4": 14}


def test_eviction_removes_the_least_recently_used(tmp_path):
    files = []
    for i in range(4):
        f = tmp_path / f"{i}.safetensors"
        f.write_bytes(b"x" * 1000)
        os.utime(f, ns=(10**18 + i, 10**18 + i))
        files.append(f)
    os.utime(files[0], ns=(10**18 + 9, 10**18 + 9))    # entry 0 was just read: most recent
    removed = evict(tmp_path, budget=2500, keep=files[1])
    assert removed == [files[2], files[3]]                   # oldest first; the kept one is skipped
    assert files[0].is_file() and files[1].is_file()
    assert sum(f.stat().st_size for f in _entries(tmp_path)) <= 2500


def test_cache_command_lists_and_clears(checkpoints, cache, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from quantkit.cli.main import app

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "home-cache"))
    load(checkpoints / "w4", kernel="auto")
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "--json", "-"])
    assert res.exit_code == 0, res.output
    rows = {r["area"]: r for r in json.loads(res.stdout)}
    assert rows["packed"]["entries"] == 1 and rows["packed"]["bytes"] == _entries(cache)[0].stat().st_size
    res = runner.invoke(app, ["cache", "--clear", "packed", "--json", "-"])
    assert res.exit_code == 0 and _entries(cache) == []
    res = runner.invoke(app, ["cache", "--clear", "everything"])
    assert res.exit_code == 2 and "--clear takes one of packed, eval, models, all" in res.output
