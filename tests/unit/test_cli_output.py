"""What a newcomer sees at default verbosity: the demo's lines, the table and nothing else; library
warnings counted once; INFO lines and every warning with --verbose."""

from __future__ import annotations

import logging

from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.cli.ui import LibraryWarnings

runner = CliRunner()


def test_demo_on_a_tiny_model_prints_a_few_lines(tiny_llama, tmp_path):
    """bitsandbytes' LLM.int8 logs a cast warning on every forward: counted, never printed one by one."""
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tiny_llama), "--out", str(out), "--only", "rtn-w8", "--only", "int8",
            "--max-windows", "1", "--no-speed", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) < 16, res.output
    assert "MatMul8bitLt" not in res.stdout and "INFO" not in res.output and "pip install kernels" not in res.output
    err = res.stderr.splitlines()
    assert err[0] == f"✓ rtn-w8: quantized in {err[0].split(' in ')[1].split(' s ')[0]} s -> {out / 'rtn-w8'}"
    assert [ln.split(":")[0] for ln in err[2:5]] == ["✓ llama (base)", "✓ rtn-w8", "✓ int8"]
    summary = [ln for ln in err if ln.startswith("bitsandbytes: ")]
    assert len(summary) == 1 and "MatMul8bitLt: inputs will be cast" in summary[0]
    assert summary[0].endswith("(shown with --verbose)")
    md = res.stdout.splitlines()
    assert md[0].startswith("| model | method |") and any("| int8 | int8 (bnb LLM.int8) |" in ln for ln in md)
    assert any(ln.startswith("| rtn-w8 | rtn | ") for ln in md)

    verbose = runner.invoke(app, ["--verbose", *args])  # reuses the checkpoints
    assert verbose.exit_code == 0, verbose.output
    assert verbose.stderr.count("MatMul8bitLt") > 10 and "reusing" in verbose.stderr
    assert "kernels:" in verbose.stderr and "warnings hidden" not in verbose.stderr


def test_library_warnings_are_counted_per_package():
    counter = LibraryWarnings(show=False)
    make = lambda name, msg, level=logging.WARNING, args=(): logging.LogRecord(name, level, "f.py", 1, msg, args, None)  # noqa: E731
    for _ in range(3):
        assert not counter.filter(make("bitsandbytes.autograd._functions", "inputs cast from %s", args=("fp32",)))
    assert not counter.filter(make("bitsandbytes.backends.cpu.ops", "pip install kernels"))
    assert counter.filter(make("quantkit.eval.runner", "ours"))  # quantkit's own warnings are shown
    assert counter.filter(make("bitsandbytes", "boom", logging.ERROR))  # errors are shown
    assert not counter.filter(make("py.warnings", "/x/site-packages/transformers/a.py:3: UserWarning: careful\n  warn()"))
    assert counter.summary() == [
        'bitsandbytes: 4 warnings hidden, 3 of them "inputs cast from fp32" (shown with --verbose)',
        'transformers: 1 warning hidden, "careful" (shown with --verbose)']
    assert LibraryWarnings(show=True).filter(make("bitsandbytes", "x"))
