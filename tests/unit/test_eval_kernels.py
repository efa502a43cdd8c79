"""The speed pass runs on the fastest kernels; quality stays on the exact reference maths."""

from quantkit.api import quantize
from quantkit.eval.runner import evaluate_paths
from quantkit.eval.speed import SpeedConfig


def test_speed_pass_uses_kernels_and_quality_the_reference(tiny_llama, tmp_path, text_file):
    out = tmp_path / "q"
    quantize(tiny_llama, "rtn", out, scheme="w4g64", device="cpu")
    speed = SpeedConfig(prompt_len=8, gen_tokens=4, batch=2, repeats=1)
    common = dict(base=str(tiny_llama), dataset=str(text_file), seqlen=32, max_windows=2, device="cpu",
                  cache_root=tmp_path / "cache")
    fast = evaluate_paths([str(out)], speed=speed, kernel="auto", **common)["rows"][1]
    ref = evaluate_paths([str(out)], kernel="reference", **common)["rows"][1]
    assert fast["kernels"] == {"cpu-int4": 14} and fast["tps"] > 0
    assert ref["kernels"] == {"reference": 14}
    assert fast["ppl"] == ref["ppl"] and fast["kl"] == ref["kl"]  # quality is scored on the reference either way
