"""A damaged safetensors or GGUF file, or pickle-only weights: one line naming the file, exit 2, on every
command that reads a model (never `internal error`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantkit.cli.main import app
from quantkit.convert import convert

runner = CliRunner()


def _cut(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


@pytest.fixture(scope="module")
def damaged(tiny_llama, tmp_path_factory):
    """name -> (path, the file the message must name, what it must say)."""
    root = tmp_path_factory.mktemp("damaged")
    out = {}
    for name, keep, needle in (("truncated", None, "is truncated"), ("header", 200, "is damaged")):
        folder = root / name
        shutil.copytree(tiny_llama, folder)
        _cut(folder / "model.safetensors", keep)
        out[name] = (folder, folder / "model.safetensors", needle)
    garbage = root / "garbage"
    shutil.copytree(tiny_llama, garbage)
    st = garbage / "model.safetensors"
    st.write_bytes(st.read_bytes()[:8] + b"{not json" + st.read_bytes()[17:])
    out["garbage"] = (garbage, st, "header is not valid")
    pickle = root / "pickle"
    pickle.mkdir()
    shutil.copy(tiny_llama / "config.json", pickle)
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    out["pickle"] = (pickle, pickle / "pytorch_model.bin", "safe_serialization=True")
    gguf = root / "m.gguf"
    convert(tiny_llama, "gguf", gguf, gguf_type="q8_0")  # the API: a CLI call here would set up logging
    for name, keep in (("gguf-truncated", None), ("gguf-header", 300)):
        cut = root / f"{name}.gguf"
        shutil.copy(gguf, cut)
        _cut(cut, keep)
        out[name] = (cut, cut, "is damaged or truncated")
    notgguf = root / "text.gguf"
    notgguf.write_text("hello")
    out["not-gguf"] = (notgguf, notgguf, "is not a GGUF file")
    return out


COMMANDS = {
    "quantize": lambda p, tmp, _: ["quantize", str(p), "-o", str(tmp / "q")],
    "info": lambda p, tmp, _: ["info", str(p)],
    "eval": lambda p, tmp, text: ["eval", str(p), "--dataset", str(text), "--seqlen", "32", "--max-windows", "1"],
    "eval-base": lambda p, tmp, text: ["eval", str(p), "--base", str(p), "--dataset", str(text), "--seqlen", "32",
                                       "--max-windows", "1"],
    "convert-gguf": lambda p, tmp, _: ["convert", str(p), "--to", "gguf", str(tmp / "o.gguf")],
    "convert-hf": lambda p, tmp, _: ["convert", str(p), "--to", "hf", str(tmp / "o")],
}


@pytest.mark.parametrize("case", ["truncated", "header", "garbage", "pickle", "gguf-truncated", "gguf-header",
                                  "not-gguf"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_damaged_file_is_one_line_naming_it(damaged, case, command, tmp_path, text_file):
    path, file, needle = damaged[case]
    res = runner.invoke(app, COMMANDS[command](path, tmp_path, text_file))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert str(file) in lines[0] and needle in lines[0], lines[0]
    assert "internal error" not in res.output and "Traceback" not in res.output


def test_damaged_row_beside_a_good_one_fails_the_eval(damaged, tiny_llama, text_file):
    """Evaluating a damaged checkpoint beside the base: the row names the file, and the run exits 1."""
    path, file, _ = damaged["truncated"]
    res = runner.invoke(app, ["eval", str(path), "--base", str(tiny_llama), "--dataset", str(text_file),
                              "--seqlen", "32", "--max-windows", "1", "-q"])
    assert res.exit_code == 1, res.output
    assert f"{file} is truncated" in res.stderr and "internal error" not in res.output


def test_safetensors_error_from_a_library_is_a_user_error():
    from safetensors import SafetensorError

    from quantkit.cli.main import _message

    assert _message(SafetensorError("Error while deserializing header: invalid header length")) == (
        "error: a safetensors file is damaged or unreadable: Error while deserializing header: invalid header "
        "length; re-download or re-export it", 2)
