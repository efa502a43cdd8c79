"""Tables, caption and plot of an eval result; the CLI end to end with --speed, --stride and --plot."""

import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.errors import QuantkitError
from quantkit.eval.plot import pareto_front, plot
from quantkit.eval.report import markdown, rich_report, rich_tables, sorted_rows
from quantkit.eval.runner import new_row

PNG = b"\x89PNG\r\n\x1a\n"


def fake_result(speed=True):
    rows = []
    for name, size, ppl, kl, tps, base in [("w3", 60e6, 30.0, 0.8, 50.0, False), ("base", 500e6, 15.0, 0.0, 20.0, True),
                                           ("w4", 100e6, 18.0, 0.2, 40.0, False), ("bad4", 120e6, 19.0, 0.3, 30.0, False)]:
        r = new_row(name, base)
        r.update(size_bytes=size, ppl=ppl, kl=kl, top1=100 - 30 * kl, tps=tps, ttft_ms=12.0, throughput_tps=4 * tps,
                 rel_speed=tps / 20.0, bits_per_weight=4.0, method="rtn", peak_bytes=size * 1.2,
                 delta_ppl_pct=100 * (ppl / 15 - 1))
        rows.append(r)
    broken = new_row("broken", False)
    broken["error"] = "broken has no config.json; is it a Hugging Face model folder?"
    rows.insert(0, broken)
    proto = {"dataset": "wiki-vital", "split": "tail", "split_text": "last 200,000 characters", "seqlen": 512,
             "stride": 512, "windows": 40, "predicted_tokens": 20440, "overlapping": False, "device": "cpu",
             "device_name": "Test CPU", "dtype": "float32",
             "speed": {"prompt_len": 128, "gen_tokens": 64, "batch": 8, "repeats": 3, "timer": "perf_counter"} if speed else None}
    return {"schema_version": 2, "protocol": proto, "rows": rows}


def test_pareto_front():
    pts = [(60, 30.0), (500, 15.0), (100, 18.0), (120, 19.0), (100, 25.0)]
    assert pareto_front(pts) == [0, 2, 1]


def test_plot_is_a_valid_png(tmp_path):
    out = plot(fake_result(), tmp_path / "p.png")
    data = out.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR" and len(data) > 5000
    plot(fake_result(), tmp_path / "kl.png", metric="kl")
    assert (tmp_path / "kl.png").read_bytes()[:8] == PNG
    with pytest.raises(QuantkitError, match="png"):
        plot(fake_result(), tmp_path / "p.jpg")


def test_rows_sorted_base_first_failures_last():
    names = [r["model"] for r in sorted_rows(fake_result())]
    assert names == ["base", "w4", "bad4", "w3", "broken"]


def test_markdown_and_rich_tables():
    md = markdown(fake_result())
    header = md.splitlines()[0]
    for col in ("method", "bits/w", "size MB", "mem MB", "speed ×", "TTFT ms", "TPS", "ppl", "Δppl %", "KL", "top-1 %"):
        assert col in header
    assert "| base (base) |" in md and "failed: broken has no config.json" in md
    assert "40 non-overlapping windows of 512 tokens" in md and "median of 3 runs" in md
    assert "TTFT" not in markdown(fake_result(speed=False)).splitlines()[0]
    console = Console(record=True, width=200)
    console.print(rich_report(fake_result(), 200))
    text = console.export_text()
    assert "base (base)" in text and "Test CPU" in text


def test_cli_eval_with_speed_stride_and_plot(tiny_llama, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(app, ["eval", str(tiny_llama), "--base", str(tiny_llama), "--dataset", str(text_file),
                                 "--seqlen", "64", "--stride", "32", "--max-windows", "3", "--speed",
                                 "--prompt-len", "8", "--gen-tokens", "4", "--batch", "2", "--repeats", "1",
                                 "--device", "cpu", "--json", str(tmp_path / "e.json"), "--plot",
                                 str(tmp_path / "e.png"), "--markdown", str(tmp_path / "e.md")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["protocol"]["stride"] == 32 and data["protocol"]["predicted_tokens"] == 63 + 2 * 32
    assert all(row["tps"] > 0 for row in data["rows"])
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG
    assert "TTFT ms" in (tmp_path / "e.md").read_text()


def test_cli_eval_rejects_a_non_png_plot(tiny_llama, tmp_path):
    r = CliRunner().invoke(app, ["eval", str(tiny_llama), "--plot", str(tmp_path / "x.svg")])
    assert r.exit_code == 2 and "give a file name ending in .png" in r.stderr


def _render(result, width):
    console = Console(record=True, width=width)
    console.print(rich_report(result, width))
    return console.export_text()


NUMBERS = ("15.000", "+100.0", "0.8000", "76.00", "500.0", "600", "2.50", "12.0", "50.0", "200.0", "4.00")


@pytest.mark.parametrize("speed", [True, False])
def test_rich_report_fits_80_columns_as_two_tables(speed):
    """At 80 columns: a quality and a cost table, every line within 80, no cell cut to "…"."""
    result = fake_result(speed)
    result["rows"][2]["label"] = "demo-out/gptq-w4g64-a-long-checkpoint-name"
    text = _render(result, 80)
    assert [t.title for t in rich_tables(result, 80)] == ["quantkit eval: quality", "quantkit eval: cost"]
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    for number in NUMBERS if speed else ("15.000", "+100.0", "0.8000", "76.00", "500.0", "600", "4.00"):
        assert f" {number} " in text, number
    quality, cost = text.split("wiki-vital (")[0].split("quantkit eval: cost")
    assert "top-1" in quality and "TTFT" not in quality and "KL" not in cost
    assert ("TTFT" in cost) == speed and "bits/w" in cost
    assert quality.count("failed") == 1 and cost.count("failed") == 1  # the broken row, reason not in the cell
    assert "no config.json" not in text


def test_rich_report_is_one_table_at_200_columns():
    text = _render(fake_result(), 200)
    assert [t.title for t in rich_tables(fake_result(), 200)] == ["quantkit eval"]
    assert "batch tok/s" in text and "…" not in text and max(len(line) for line in text.splitlines()) <= 200
    header = next(line for line in text.splitlines() if "bits/w" in line)
    assert "top-1 %" in header and "TTFT ms" in header  # quality and cost side by side
