"""Speed, timers, memory and device selection (CUDA paths through mocks: no GPU here)."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.eval import hardware
from quantkit.eval.memory import PeakMemory, model_bytes
from quantkit.eval.speed import SpeedConfig, measure
from quantkit.models.sources import load_model, resolve


def test_speed_figures_are_positive_and_consistent(tiny_llama):
    # Only structure is asserted here: which is faster is a benchmark's claim (benchmarks/eval.py),
    # not a timed test's, since this machine is shared and noisy.
    model, _ = load_model(resolve(str(tiny_llama)))
    prompts = torch.randint(0, 320, (8, 32))
    res = measure(model, prompts, SpeedConfig(prompt_len=32, gen_tokens=16, batch=8, repeats=3), torch.device("cpu"))
    assert res.ttft_ms > 0 and res.tps > 0 and res.throughput_tps > 0
    assert res.batch == 8 and res.runs == 3


def test_speed_config_checks():
    with pytest.raises(QuantkitError, match="--gen-tokens"):
        SpeedConfig(gen_tokens=1).check()
    with pytest.raises(QuantkitError, match="--batch"):
        SpeedConfig(batch=0).check()


def test_select_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.select_device("auto") == torch.device("cpu")
    assert hardware.select_device("cpu") == torch.device("cpu")
    with pytest.raises(QuantkitError, match="no CUDA device"):
        hardware.select_device("cuda")
    with pytest.raises(QuantkitError, match="unknown --device"):
        hardware.select_device("gpu0")
    with pytest.raises(QuantkitError, match="not supported"):
        hardware.select_device("meta")


def test_select_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert hardware.select_device("auto") == torch.device("cuda")
    assert hardware.select_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(QuantkitError, match="only 2 CUDA"):
        hardware.select_device("cuda:2")
    cuda = torch.device("cuda")
    assert hardware.default_seqlen(cuda) == 2048 and hardware.default_seqlen(torch.device("cpu")) == 512
    assert hardware.resolve_dtype("auto", cuda) == torch.float16
    assert hardware.resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert hardware.resolve_dtype("bfloat16", cuda) == torch.bfloat16
    with pytest.raises(QuantkitError, match="unknown --dtype"):
        hardware.resolve_dtype("int4", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"Fake GPU {index}")
    assert hardware.device_name(torch.device("cuda:1")) == "Fake GPU 1"
    assert "threads" in hardware.device_name(torch.device("cpu"))


def test_stopwatch_uses_cuda_events_on_gpu(monkeypatch):
    calls = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            calls.append("record")

        def elapsed_time(self, other):
            return 1500.0  # milliseconds

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    watch = hardware.Stopwatch(torch.device("cuda"))
    watch.start()
    assert watch.stop() == 1.5
    assert calls == ["sync", "record", "record", "sync"]
    cpu = hardware.Stopwatch(torch.device("cpu"))
    cpu.start()
    assert cpu.stop() >= 0


def test_peak_memory_on_gpu_uses_the_allocator(monkeypatch):
    state = {"allocated": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    with PeakMemory(torch.device("cuda")) as pm:
        state["peak"] = 1100
    assert pm.kind == "cuda_allocated" and pm.peak_bytes == 1000


def test_model_bytes_counts_tied_weights_once(tiny_llama):
    model, _ = load_model(resolve(str(tiny_llama)))
    n = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups tied ones
    assert model_bytes(model) >= n and model_bytes(model) < n + sum(b.nbytes for b in model.buffers()) + 1


_PEAK_CHILD = """
import sys, time, torch
import quantkit.eval.memory as memory
from quantkit.eval.memory import PeakMemory
if sys.argv[1] == "sampling":
    memory.reset_peak_rss = lambda: False
with PeakMemory(torch.device("cpu"), interval=0.002) as pm:
    kernel, thread = pm._kernel_peak, pm._thread is not None
    block = torch.ones(64 << 20, dtype=torch.uint8)
    block.add_(1)
    time.sleep(0.05)
    del block
print(kernel, thread, pm.peak_bytes)
"""


@pytest.mark.parametrize("mode", ["sampling", "kernel"])
def test_peak_rss_counts_a_short_allocation(mode):
    """Both ways of measuring see a 64 MiB allocation, in a fresh process (in this one, freed memory
    from earlier tests may be reused without growing RSS)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, mode], capture_output=True, text=True, check=True)
    kernel, thread, peak = out.stdout.split()
    if mode == "sampling":
        assert thread == "True" and kernel == "False"
    else:
        if kernel != "True":
            pytest.skip("this kernel does not let the process reset VmHWM")
        assert thread == "False"  # no sampler runs beside the measured work
    assert int(peak) > 40 << 20
