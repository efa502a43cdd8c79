"""`quantkit demo` end to end on one cheap entry: table, JSON, Markdown and plot."""

import json

import pytest
from typer.testing import CliRunner

from quantkit.cli.main import app

pytestmark = pytest.mark.slow


def test_demo_rtn_entry_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--only", "rtn-w4g64", "--max-windows", "2",
                                   "--no-speed", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "results.json").read_text())
    base = next(r for r in result["rows"] if r["is_base"])
    rtn = next(r for r in result["rows"] if not r["is_base"])
    assert len(result["rows"]) == 2 and rtn["label"].endswith("rtn-w4g64")
    assert rtn["ppl"] > base["ppl"] > 1 and 0 < rtn["kl"] and rtn["top1"] < 100.0
    assert rtn.get("tps") is None  # --no-speed: no generation timed (the speed pass is tested on tiny models)
    assert "rtn-w4g64" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
