"""`--opt activations=auto`: q8_target onto the GGUF mixes where it was measured to pay, float elsewhere and off
GGUF; never refused off GGUF; the record shows what it resolved to. The default stays float (q5_k_s: no gain)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader
from typer.testing import CliRunner

from quantkit.api import make_job
from quantkit.cli.main import app
from quantkit.convert import gguf_provenance_path
from quantkit.convert.gguf_mix import MIXES
from quantkit.errors import SchemeError
from quantkit.methods.base import GridTarget
from quantkit.methods.gptq.run import Q8_TARGET_MIXES, GPTQOptions, resolved_activations
from quantkit.methods.gptq.steps import ROUNDING

runner = CliRunner()


def test_auto_resolves_by_mix():
    assert GPTQOptions().activations == "float"
    assert Q8_TARGET_MIXES and Q8_TARGET_MIXES <= set(MIXES)
    assert Q8_TARGET_MIXES.isdisjoint({"q5_k_s", "q4_k_m", "q4_0", "q2_k"})  # measured no gain / not measured
    auto = GPTQOptions(activations="auto")
    for mix in MIXES:
        want = "q8_target" if mix in Q8_TARGET_MIXES else "float"
        assert resolved_activations(auto, GridTarget({}, f"gguf {mix}", mix)) == want, mix
    for mix in ("q5_k_m", "q6_k", "q8_0"):  # measured to pay (40 chunks, llama-perplexity)
        assert resolved_activations(auto, GridTarget({}, f"gguf {mix}", mix)) == "q8_target"
    assert resolved_activations(auto, GridTarget({}, "gguf q5_k_s", "q5_k_s")) == "float"  # measured: no gain
    assert resolved_activations(auto, GridTarget({}, "gguf q4_k_m", "q4_k_m")) == "float"  # 4-bit: not measured
    assert resolved_activations(auto, GridTarget({}, "gguf q8_0")) == "float"  # a target without its mix
    assert resolved_activations(auto, None) == "float"  # off GGUF
    for mode in ("float", "q8", "q8_hessian", "q8_target"):  # an explicit choice is kept, whatever the mix
        opts = GPTQOptions(activations=mode)
        assert resolved_activations(opts, GridTarget({}, "gguf q4_k_m", "q4_k_m")) == mode
        assert resolved_activations(opts, GridTarget({}, "gguf q8_0", "q8_0")) == mode
    # a composed method's rounding step has no such option: float
    assert resolved_activations(ROUNDING.Options(), GridTarget({}, "gguf q8_0", "q8_0")) == "float"


def test_auto_and_float_pass_off_gguf_the_others_refused(tiny_llama):
    from quantkit.methods.gptq.run import GPTQ

    for opts in ({}, {"activations": "auto"}, {"activations": "float"}):
        impl, job = make_job(tiny_llama, "gptq", options=opts, device="cpu")
        assert isinstance(impl, GPTQ)
        assert impl.prepare(job) is not None
        assert "activations" not in impl.describe(job)["options"]  # off GGUF the record leaves it out
    for mode in ("q8", "q8_hessian", "q8_target"):
        impl, job = make_job(tiny_llama, "gptq", options={"activations": mode}, device="cpu")
        with pytest.raises(SchemeError, match="--opt activations goes with --format gguf"):
            impl.prepare(job)


def _quantize(model, out, text_file, gguf_type, *extra):
    r = runner.invoke(app, ["quantize", str(model), "--method", "gptq", "--out", str(out), "--dataset",
                            str(text_file), "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--quiet",
                            "--format", "gguf", "--type", gguf_type, *extra])
    assert r.exit_code == 0, r.output
    return json.loads(gguf_provenance_path(out).read_text())


def _tensors(path):
    return {t.name: np.asarray(t.data) for t in GGUFReader(str(path)).tensors}


def test_cli_auto_records_what_it_resolved_to(tiny_llama, text_file, tmp_path):
    assert "q8_0" in Q8_TARGET_MIXES and "q4_0" not in Q8_TARGET_MIXES
    auto, explicit = tmp_path / "auto.gguf", tmp_path / "explicit.gguf"
    rec = _quantize(tiny_llama, auto, text_file, "q8_0", "--opt", "activations=auto")
    assert rec["options"]["activations"] == "q8_target"
    rec = _quantize(tiny_llama, explicit, text_file, "q8_0", "--opt", "activations=q8_target")
    assert rec["options"]["activations"] == "q8_target"
    a, b = _tensors(auto), _tensors(explicit)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # auto is q8_target here
    plain = _quantize(tiny_llama, tmp_path / "q4.gguf", text_file, "q4_0", "--opt", "activations=auto")
    assert plain["options"]["activations"] == "float"
    assert _quantize(tiny_llama, tmp_path / "d.gguf", text_file, "q8_0")["options"]["activations"] == "float"
