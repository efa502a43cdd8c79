"""The memory plan: pure estimates from config + headers, `--plan`, and the refusal before loading."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from quantkit import api, memcheck
from quantkit.cli.main import app
from quantkit.methods.gptq.memory import gptq_block_memory
from quantkit.plan import F32, F64, MiB, Settings, estimate, geometry
from tests.tiny import llama_config, make_model, write_text

BASE = 300 * MiB  # the process RSS the plan starts from (fixed: the tests do not depend on this process's heap)


@pytest.fixture(autouse=True)
def fixed_rss(monkeypatch):
    monkeypatch.setattr(memcheck, "_rss", lambda: BASE)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("plan")
    return make_model(base / "m", llama_config(layers=16, hidden=256, inter=768)), write_text(base / "calib.txt")


def _header(folder):
    from quantkit.formats.shards import raw_header

    return raw_header(folder / "model.safetensors")


def test_geometry_from_headers(model):
    folder, _ = model
    g = geometry(json.loads((folder / "config.json").read_text()), _header(folder))
    assert (g.n_blocks, g.hidden, g.heads, g.inter) == (16, 256, 4, 768)
    # q/k/v stacked (256 + 2 * 128 rows, GQA), o, gate/up stacked, down
    assert g.groups == ((512, 256), (256, 256), (1536, 256), (256, 768))
    assert g.block_params == 256 * 256 * 2 + 2 * 128 * 256 + 3 * 256 * 768 + 2 * 256
    assert g.outside_params == 320 * 256 + 256  # tied embeddings + final norm


def test_estimate_moves_with_the_settings(model):
    folder, _ = model
    g = geometry(json.loads((folder / "config.json").read_text()), _header(folder))
    s = Settings(method="gptq", nsamples=64, seqlen=256, batch_size=4)
    plan = estimate(g, s, BASE)
    block = {st.name: st for st in plan.stages}["block + activations"]
    acts = 64 * 256 * 256 * 4
    bigger = {st.name: st for st in estimate(g, replace(s, nsamples=128), BASE).stages}["block + activations"]
    recorded = 64 * 256 * g.hidden * 4  # GPTQ shortcuts: o_proj's inputs
    # inputs + outputs + the recorded Linear inputs, with allocator slack
    assert bigger.host - block.host == pytest.approx((2 * acts + recorded) * 1.1, rel=0.01)
    off = estimate(g, replace(s, offload=True), BASE)
    assert plan.host - off.host >= 0.9 * 15 * g.block_params * 4  # all but one block stay on disk
    assert plan.disk > 0 and {st.name for st in plan.stages} >= {"baseline", "model load", "save"}
    rtn = estimate(g, replace(s, method="rtn"), BASE)
    assert "block + activations" not in {st.name for st in rtn.stages} and rtn.disk > 0
    cuda = estimate(g, replace(s, device="cuda"), BASE)
    assert cuda.device > 0 and plan.device == 0


def _cli(folder, text, out, *extra, **env):
    args = ["quantize", str(folder), "-o", str(out), "-m", "gptq", "--bits", "4", "--group-size", "64",
            "--dataset", str(text), "--nsamples", "64", "--seqlen", "256", "--batch-size", "4", "--device", "cpu",
            *extra]
    return CliRunner(env=env).invoke(app, args)


def test_plan_flag_prints_and_writes_nothing(model, tmp_path):
    folder, text = model
    r = _cli(folder, text, tmp_path / "q", "--plan")
    assert r.exit_code == 0, r.output
    assert "block + activations" in r.stdout and "fits" in r.stdout
    assert not list(tmp_path.iterdir())
    r = _cli(folder, text, tmp_path / "q", "--plan", "--json", "-", QUANTKIT_MEMORY_LIMIT="1MiB")
    data = json.loads(r.stdout)
    assert r.exit_code == 0 and data["fits"] is False and data["available_host_bytes"] == 2**20
    assert [s["name"] for s in data["stages"]][0] == "baseline" and data["peak_host_bytes"] > 0


def _plans(folder, text):
    kw = dict(scheme={"bits": 4, "group_size": 64}, device="cpu",
              calib={"dataset": str(text), "nsamples": 64, "seqlen": 256, "batch_size": 4})
    return api.plan(folder, "gptq", **kw).host, api.plan(folder, "gptq", options={"offload": "disk"}, **kw).host


def _one_error_line(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    return lines[0]


def test_a_small_machine_is_refused_before_loading_with_the_option_that_fits(model, tmp_path):
    folder, text = model
    in_memory, offloaded = _plans(folder, text)
    assert offloaded < in_memory
    limit = str((in_memory + offloaded) // 2)
    line = _one_error_line(_cli(folder, text, tmp_path / "q", QUANTKIT_MEMORY_LIMIT=limit))
    assert "exceeds the" in line and "QUANTKIT_MEMORY_LIMIT" in line and "with --offload disk the plan needs" in line
    assert not list(tmp_path.iterdir())  # nothing loaded, nothing written, no work folder
    line = _one_error_line(_cli(folder, text, tmp_path / "q", "--offload", "disk",
                                QUANTKIT_MEMORY_LIMIT=str(offloaded - 1)))
    assert "--nsamples 32" in line  # offload already on: fewer samples is the next smaller setting
    line = _one_error_line(_cli(folder, text, tmp_path / "q", QUANTKIT_MEMORY_LIMIT="100MiB"))
    assert "no smaller" in line
    line = _one_error_line(_cli(folder, text, tmp_path / "q", QUANTKIT_MEMORY_LIMIT="lots"))
    assert "QUANTKIT_MEMORY_LIMIT 'lots' is not a size" in line


def test_the_limit_allows_a_run_that_fits(model, tmp_path, monkeypatch):
    folder, text = model
    in_memory, _ = _plans(folder, text)
    s = api.quantize(folder, "rtn", tmp_path / "q", scheme={"bits": 4, "group_size": 64}, device="cpu")
    assert s["memory_plan_peak_bytes"] > BASE
    monkeypatch.setenv("QUANTKIT_MEMORY_LIMIT", str(in_memory + MiB))
    r = _cli(folder, text, tmp_path / "g", "--nsamples", "4", "--seqlen", "32")  # smaller than the plan above
    assert r.exit_code == 0, r.output


def _smollm2_geometry():
    """SmolLM2-135M's block shapes (hidden 576, 9 heads, 3 KV heads, intermediate 1536), without its files."""
    from quantkit.plan import Geometry

    linears = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
    return Geometry(n_blocks=30, hidden=576, heads=9, inter=1536, block_params=sum(o * i for o, i in linears) + 2 * 576,
                    groups=((960, 576), (576, 576), (3072, 576), (576, 1536)), linears=linears,
                    outside_params=49152 * 576 + 576, mapped=False, max_tensor=49152 * 576)


def test_awq_grid_term_follows_the_candidate_chunks(model):
    """What methods/awq.py keeps alive while scoring candidate scales (plan._awq_grid_elements)."""
    from quantkit.methods.awq.memory import grid_elements as _awq_grid_elements
    from quantkit.plan import F32, _block_method_bytes

    # smollm2 at 64 x 512: down_proj (576 x 1536) is chunked, k = 2**24 // (576 * 1536) = 18 candidates:
    # W * s and two fake_quantize temporaries of 18 x 576 x 1536 floats (182 MiB, not 7 x 64 MiB)
    g = _smollm2_geometry()
    assert _awq_grid_elements(g, 576, 1536, 2048) == 3 * 18 * 576 * 1536
    # gate/up (2 x 1536 rows): k = 9; the 9 candidates of both plus two temporaries of the last one
    assert _awq_grid_elements(g, 3072, 576, 2048) == 9 * 3072 * 576 + 2 * 9 * 1536 * 576
    # o_proj (576 x 576), unchunked (20): scoring it as a Linear is larger than making it: the candidates,
    # W_hat - W, and x @ d^T with its square on the 512 screening tokens
    assert _awq_grid_elements(g, 576, 576, 2048) == 2 * 20 * 576 * 576 + 2 * 20 * 512 * 576
    s = Settings(method="awq", group_size=64, nsamples=64, seqlen=512)
    stats = (576 + 576 + 576 + 1536) * (64 + 2048) * F32
    calls = 2 * 2048 * 576 * F32 * 4
    assert _block_method_bytes(g, s)[0] == stats + calls + 3 * 18 * 576 * 1536 * F32

    # the tiny test model (hidden 256, intermediate 768) is not chunked: all 20 candidates of gate/up at once
    folder, _ = model
    tiny = geometry(json.loads((folder / "config.json").read_text()), _header(folder))
    grid = max(_awq_grid_elements(tiny, r, i, 2048) for r, i in tiny.groups)
    assert grid == 20 * 1536 * 256 + 2 * 20 * 768 * 256  # 60 MiB


def test_awq_mapped_file_term_grows_over_the_blocks_not_at_the_load(model):
    """AWQ on a float32 checkpoint (transformers maps it): the scaled weights it assigns add one block's Linears
    per block while the file's pages stay resident, so the block and save stages carry them, the load does not."""
    folder, _ = model
    g = geometry(json.loads((folder / "config.json").read_text()), _header(folder))
    assert g.mapped
    s = Settings(method="awq", group_size=64, nsamples=32, seqlen=256)
    mapped = {st.name: st.host for st in estimate(g, s, BASE).stages}
    copied = {st.name: st.host for st in estimate(replace(g, mapped=False), s, BASE).stages}
    grown = 16 * sum(o * i for o, i in g.linears) * 4
    assert mapped["model load"] == copied["model load"] and mapped["calibration data"] == copied["calibration data"]
    for name in ("block + activations", "save"):
        assert mapped[name] - copied[name] == pytest.approx(grown * 1.1, abs=2)


def test_offload_block_stage_creeps_with_depth(model):
    """--offload disk: one hidden x hidden float32 per block on the block stage (measured creep, see plan.py)."""
    folder, _ = model
    g = geometry(json.loads((folder / "config.json").read_text()), _header(folder))
    s = Settings(method="gptq", nsamples=16, seqlen=256, offload=True)
    deep = {st.name: st.host for st in estimate(g, s, BASE).stages}
    shallow = {st.name: st.host for st in estimate(replace(g, n_blocks=4), s, BASE).stages}
    creep = 12 * 256 * 256 * 4  # 12 more blocks of hidden 256
    assert deep["block + activations"] - shallow["block + activations"] == pytest.approx(creep * 1.1, abs=2)
    assert deep["model load"] == shallow["model load"]
    deep_mem = {st.name: st.host for st in estimate(g, replace(s, offload=False), BASE).stages}
    shallow_mem = {st.name: st.host for st in estimate(replace(g, n_blocks=4), replace(s, offload=False), BASE).stages}
    assert deep_mem["block + activations"] - shallow_mem["block + activations"] == pytest.approx(
        12 * g.block_params * 4 * 1.1, abs=2)  # without offload: the blocks themselves, no creep term


def test_gptq_work_runs_between_forwards(model):
    """GPTQ's Cholesky and column loop run after the forward that fed the group's Hessian: the block stage
    holds the larger of (forward + that Hessian) and the method's work, where AWQ (which scores candidates by
    running parts of the block) holds both."""
    from quantkit.plan import F32, F64, _block_method_bytes, _forward_bytes

    folder, _ = model
    g = geometry(json.loads((folder / "config.json").read_text()), _header(folder))
    s = Settings(method="gptq", nsamples=16, seqlen=256)
    # down_proj (256 x 768) is the largest group input: H, then two float64 copies in inverse_cholesky
    assert _block_method_bytes(g, s)[0] == max(768 * 768 * F32 + 2 * 768 * 768 * F64,
                                                2 * 768 * 768 * F32 + 5 * 256 * 768 * F32)
    stages = {st.name: st.host for st in estimate(g, s, BASE).stages}
    zero_work = {st.name: st.host for st in estimate(replace(g, groups=((1, 1),)), s, BASE).stages}
    forward, hess = _forward_bytes(g, s), 768 * 768 * F32
    method = _block_method_bytes(g, s)[0]
    added = max(forward + hess, method) - max(forward + 4, _block_method_bytes(replace(g, groups=((1, 1),)), s)[0])
    assert stages["block + activations"] - zero_work["block + activations"] == pytest.approx(added * 1.1, abs=2)


# ---- the options that move memory: the end-to-end stage, GPTQ's products per group and float stream
def _geometry(folder):
    return geometry(json.loads((folder / "config.json").read_text()), _header(folder))


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
    assert not sr.e2e_embedding
    assert _settings(folder, text, "signround", e2e_steps=32, e2e_embedding_lr=1e-4).e2e_embedding


def test_the_end_to_end_stage_is_planned_after_the_blocks(model):
    folder, _ = model
    g = _geometry(folder)
    s = Settings(method="signround", nsamples=16, seqlen=128, batch_size=4)  # options the end-to-end stage moves
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
    # the embedding tuned too: its gradient, the head's float32 sum and Adam's two moments
    emb = estimate(g, replace(s, e2e_windows=2, e2e_embedding=True), BASE)
    grown = _stages(emb)["end-to-end: tuning"] - _stages(two)["end-to-end: tuning"]
    assert grown == pytest.approx(4 * g.vocab * g.hidden * F32 * 1.1, rel=1e-6)
    # onto GGUF's blocks (group_size -1 there): the bytes and a float32 min part per weight, not a group per row
    per_row, headers = (estimate(g, replace(s, group_size=-1, e2e_windows=2, e2e_headers=h), BASE) for h in (0, 1))
    linear = g.n_blocks * sum(o * i for o, i in g.linears)
    shrunk = _stages(per_row)["end-to-end: tuning"] - _stages(headers)["end-to-end: tuning"]
    assert shrunk == pytest.approx(linear * (24 - F32) * 1.1, rel=1e-6)


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


def test_the_fisher_loss_plans_its_gradient_pass_before_the_blocks(model):
    folder, text = model
    assert _settings(folder, text, "signround").gradient_pass is False
    assert _settings(folder, text, "signround", loss="fisher").gradient_pass is True
    g = _geometry(folder)
    s = Settings(method="signround", nsamples=16, seqlen=128, batch_size=4)
    without, with_pass = estimate(g, s, BASE), estimate(g, replace(s, gradient_pass=True), BASE)
    assert "gradient pass" not in _stages(without)
    names = [st.name for st in with_pass.stages]
    assert names.index("model load") < names.index("gradient pass") < names.index("block + activations")
    # beyond the model: one window's whole-model graph, four vocabulary-wide logit tensors, two hidden-wide grads
    graph = g.n_blocks * 128 * (12 * g.hidden + 4 * g.inter) * F32 + 4 * 128 * g.vocab * F32 + 2 * 128 * g.hidden * F32
    # the model load holds its largest tensor once more; both stages carry the allocator's 10% above the baseline
    grown = _stages(with_pass)["gradient pass"] - _stages(with_pass)["model load"]
    assert grown == pytest.approx((graph - g.max_tensor * F32) * 1.1, rel=1e-6)
