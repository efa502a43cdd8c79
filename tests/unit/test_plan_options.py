"""The memory plan follows the options that move memory: the end-to-end stage after the blocks, and GPTQ's
products per Linear group and float stream (`Method.plan_settings` -> `quantkit.plan.Settings`)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from quantkit import api, memcheck
from quantkit.methods.gptq.memory import gptq_block_memory
from quantkit.plan import F32, F64, MiB, Settings, estimate, geometry
from tests.tiny import llama_config, make_model, write_text

BASE = 300 * MiB


@pytest.fixture(autouse=True)
def fixed_rss(monkeypatch):
    monkeypatch.setattr(memcheck, "_rss", lambda: BASE)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("plan-options")
    return make_model(base / "m", llama_config(layers=4, hidden=256, inter=768)), write_text(base / "calib.txt")


def _geometry(folder):
    from quantkit.formats.shards import raw_header

    return geometry(json.loads((folder / "config.json").read_text()), raw_header(folder / "model.safetensors"))


def _stages(plan):
    return {st.name: st.host for st in plan.stages}


def _settings(folder, text, method, **options):
    _, job = api.make_job(folder, method, scheme={"bits": 4, "group_size": 64}, device="cpu", options=options,
                          calib={"dataset": str(text), "nsamples": 16, "seqlen": 128})
    return memcheck.job_settings(job, method)


def test_the_options_reach_the_settings(model):
    folder, text = model
    assert _geometry(folder).vocab == json.loads((folder / "config.json").read_text())["vocab_size"]
    plain = _settings(folder, text, "gptq")
    assert (plain.hessians, plain.float_stream, plain.e2e_windows) == (1, False, 0)
    ft = _settings(folder, text, "gptq", float_target=True, e2e_steps=8, e2e_batch_size=4)
    assert (ft.hessians, ft.float_stream, ft.e2e_windows) == (2, True, 4)
    sr = _settings(folder, text, "signround", e2e_steps=32)
    assert sr.e2e_windows == 2 and _settings(folder, text, "signround", e2e_batch_size=4).e2e_windows == 0


def test_the_end_to_end_stage_is_planned_after_the_blocks(model):
    folder, _ = model
    g = _geometry(folder)
    s = Settings(method="signround", nsamples=16, seqlen=128, batch_size=4)
    without = estimate(g, s, BASE)
    assert not any(st.name.startswith("end-to-end") for st in without.stages)
    two, four = estimate(g, replace(s, e2e_windows=2), BASE), estimate(g, replace(s, e2e_windows=4), BASE)
    names = [st.name for st in two.stages]
    assert names.index("block + activations") < names.index("end-to-end: tuning") < names.index("save")
    # two more windows a step: the whole model's graph on 2 x 128 more tokens (12 hidden + 4 intermediate wide
    # float32 activations per token and block), one chunk of their gradient, and one batch's forward
    graph = g.n_blocks * 2 * 128 * (12 * g.hidden + 4 * g.inter) * F32 + 2 * 128 * g.hidden * F32
    grown = _stages(four)["end-to-end: tuning"] - _stages(two)["end-to-end: tuning"]
    assert grown == pytest.approx(graph * 1.1, rel=1e-6)
    # the float model is loaded a second time beside the student for its hidden states
    weights = (g.outside_params + g.n_blocks * g.block_params) * F32
    assert _stages(two)["end-to-end: float model"] - _stages(two)["model load"] >= weights
    assert two.host > without.host


def test_gptq_products_and_float_stream_are_counted(model):
    folder, _ = model
    g = _geometry(folder)
    s = Settings(method="gptq", nsamples=16, seqlen=128)
    one, three = gptq_block_memory(g, s), gptq_block_memory(g, replace(s, hessians=3))
    i = max(i for _, i in g.groups)  # down_proj's inputs: the largest group
    assert three.forward - one.forward == 2 * i * i * F32
    assert three.work == max(max(3 * n * n * F32 + 2 * n * n * F64, 4 * n * n * F32 + 5 * r * n * F32)
                             for r, n in g.groups)
    stream = gptq_block_memory(g, replace(s, float_stream=True))
    assert stream.kept - one.kept == 2 * 16 * 128 * g.hidden * F32
    base = _stages(estimate(g, s, BASE))["block + activations"]
    assert _stages(estimate(g, replace(s, hessians=3, float_stream=True), BASE))["block + activations"] > base
