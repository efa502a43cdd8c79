"""The runner: JSON schema, one model at a time, base cache, fallback strategy, failure rows."""

import json

import pytest
import torch

import quantkit
from quantkit.eval import runner
from quantkit.eval.runner import ROW_KEYS, SCHEMA_VERSION, evaluate_paths
from quantkit.eval.speed import SpeedConfig

# Pinned: changing any of these is a schema change (bump SCHEMA_VERSION and update the demo/README).
PINNED_ROW_KEYS = (
    "model", "label", "method", "format", "scheme", "size_bytes", "bits_per_weight", "bits_per_weight_all", "is_base", "cached", "error",
    "ppl", "nll", "tokens", "kl", "kl_p99", "top1", "delta_ppl_pct",
    "load_seconds", "load_peak_bytes", "weights_bytes", "eval_seconds", "eval_tokens_per_s", "eval_peak_bytes",
    "ttft_ms", "tps", "throughput_tps", "rel_speed", "gen_peak_bytes", "peak_bytes", "attn_implementation",
    "kernels", "scored_with", "kv_bytes_per_token", "context_bytes",
)
PINNED_PROTOCOL_KEYS = {
    "dataset", "text_field", "split", "split_text", "seqlen", "stride", "max_windows", "windows", "predicted_tokens",
    "overlapping", "device", "device_name", "dtype", "threads", "torch", "context", "base_logprobs", "base_cached", "speed",
}
SPEED = SpeedConfig(prompt_len=16, gen_tokens=8, batch=4, repeats=2)


@pytest.fixture(scope="module")
def rtn(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "rtn-w4g64"
    quantkit.quantize(str(tiny_llama), "rtn", out, scheme="w4g64", device="cpu")
    return out


@pytest.fixture(scope="module")
def result(tiny_llama, rtn, text_file, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return evaluate_paths([str(rtn), str(tiny_llama)], base=str(tiny_llama), dataset=str(text_file), seqlen=64,
                          max_windows=3, speed=SPEED, cache_root=cache)


def test_json_schema_is_pinned(result):
    assert SCHEMA_VERSION == 6 and ROW_KEYS == PINNED_ROW_KEYS
    assert set(result) == {"schema_version", "protocol", "rows"}
    assert set(result["protocol"]) == PINNED_PROTOCOL_KEYS
    assert set(result["protocol"]["speed"]) == {"prompt_len", "gen_tokens", "batch", "repeats", "warmup", "timer",
                                                "statistic"}
    for row in result["rows"]:
        assert tuple(row) == PINNED_ROW_KEYS
    assert json.loads(json.dumps(result)) == result


def test_rows_base_quantized_and_self(result, tiny_llama):
    base, q, twin = result["rows"]
    assert base["is_base"] and not q["is_base"] and base["model"] == str(tiny_llama)
    assert base["kl"] == 0.0 and base["top1"] == 100.0 and base["delta_ppl_pct"] == 0.0
    assert q["method"] == "rtn" and 4.0 < q["bits_per_weight"] < 5.0 and q["size_bytes"] < base["size_bytes"]
    assert q["kl"] > 1e-5 and q["kl_p99"] > q["kl"] and q["top1"] < 100.0 and q["delta_ppl_pct"] == pytest.approx(100 * (q["ppl"] / base["ppl"] - 1))
    # the base scored again as a checkpoint, against the float16 spill: KL ~ 0, exact top-1
    assert twin["kl"] == pytest.approx(0.0, abs=1e-4) and twin["top1"] == 100.0
    assert twin["ppl"] == pytest.approx(base["ppl"], rel=1e-6)
    assert result["protocol"]["base_logprobs"] == "disk-fp16"


def test_quality_is_scored_on_the_exact_maths_whatever_kernel_serves(tiny_llama, rtn, text_file, tmp_path):
    kw = dict(base=str(tiny_llama), dataset=str(text_file), seqlen=64, max_windows=2, cache_root=tmp_path)
    fast = evaluate_paths([str(rtn)], kernel="auto", **kw)["rows"][1]
    exact = evaluate_paths([str(rtn)], kernel="reference", **kw)["rows"][1]
    assert set(fast["kernels"]) - {"reference", "dense"}, fast["kernels"]  # a fast kernel serves the row
    assert fast["scored_with"] == "dense" and exact["scored_with"] == "reference"
    for k in ("ppl", "kl", "kl_p99", "top1"):
        assert fast[k] == exact[k], k  # dense is bit-identical to the reference module
    assert fast["eval_peak_bytes"] is not None and fast["peak_bytes"] is not None


def test_speed_and_memory_figures(result):
    for row in result["rows"]:
        assert row["ttft_ms"] > 0 and row["tps"] > 0 and row["throughput_tps"] > 0
        assert row["load_seconds"] >= 0 and row["weights_bytes"] > 0 and row["peak_bytes"] is not None
        assert row["eval_tokens_per_s"] > 0 and row["attn_implementation"]
    assert result["rows"][0]["rel_speed"] == 1.0


def test_base_is_cached_by_content(tiny_llama, rtn, text_file, tmp_path, monkeypatch):
    kw = dict(dataset=str(text_file), seqlen=64, max_windows=2, cache_root=tmp_path)
    first = evaluate_paths([str(rtn)], base=str(tiny_llama), **kw)
    loaded = []
    real = runner.load
    monkeypatch.setattr(runner, "load", lambda name, **k: loaded.append(name) or real(name, **k))
    second = evaluate_paths([str(rtn)], base=str(tiny_llama), **kw)
    assert set(loaded) == {str(rtn)}  # the base was not loaded again (the checkpoint: served, then scored exact)
    assert second["protocol"]["base_cached"] and second["rows"][0]["cached"]
    assert second["rows"][0]["ppl"] == first["rows"][0]["ppl"] and second["rows"][1]["kl"] == first["rows"][1]["kl"]
    other = evaluate_paths([str(rtn)], base=str(tiny_llama), **{**kw, "max_windows": 3})
    assert not other["protocol"]["base_cached"]  # another protocol, another key


def test_recompute_fallback_matches_the_spill(tiny_llama, rtn, text_file, tmp_path):
    kw = dict(dataset=str(text_file), seqlen=64, max_windows=2, cache_root=tmp_path)
    spill = evaluate_paths([str(rtn)], base=str(tiny_llama), cache=False, **kw)
    again = evaluate_paths([str(rtn)], base=str(tiny_llama), cache_budget_gb=0.0, cache=False, **kw)
    assert spill["protocol"]["base_logprobs"] == "disk-fp16" and again["protocol"]["base_logprobs"] == "recompute"
    a, b = spill["rows"][1], again["rows"][1]
    assert a["ppl"] == b["ppl"] and a["top1"] == b["top1"]
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-5)
    assert not any(p.name.startswith(".base-tmp") for p in tmp_path.rglob("*"))  # temporary spills removed


def test_failed_rows_do_not_stop_the_others(tiny_llama, rtn, text_file, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama",
                                                    "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    oom_dir = tmp_path / "oom"
    oom_dir.symlink_to(rtn, target_is_directory=True)
    real_score = runner.Run.score

    def score(self, model, row, **kw):
        if row["model"] == str(oom_dir):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_score(self, model, row, **kw)

    monkeypatch.setattr(runner.Run, "score", score)
    res = evaluate_paths([str(broken), str(oom_dir), str(rtn)], base=str(tiny_llama),
                         dataset=str(text_file), seqlen=64, max_windows=2, cache_root=tmp_path / "c")
    _, b, o, ok = res["rows"]
    assert b["error"]
    assert o["error"].startswith("out of memory") and o["ppl"] is None
    assert ok["error"] is None and ok["kl"] > 0


def test_a_missing_path_is_refused_before_anything_runs(tiny_llama, tmp_path):
    from quantkit.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match="not found"):
        evaluate_paths([str(tiny_llama), str(tmp_path / "missing")], base=str(tiny_llama), cache_root=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing was scored, nothing cached


def test_nothing_to_evaluate():
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="nothing to evaluate"):
        evaluate_paths([])
