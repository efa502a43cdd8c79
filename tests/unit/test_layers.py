"""Architecture checks: no module outside methods/ names a built-in method, and the import layers hold."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import quantkit
from quantkit.registry import BUILTIN

ROOT = Path(quantkit.__file__).parent
WATCHED = [ROOT / "plan.py", ROOT / "memcheck.py", *sorted((ROOT / "cli").rglob("*.py")),
           *sorted((ROOT / "zoo").rglob("*.py"))]
NAMES = sorted({part for name in BUILTIN for part in re.split(r"[-_]", name)} | {"bnb"})
IN_STRING = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(NAMES) + r")(?![A-Za-z0-9_])")


def mentions(source: str) -> list[str]:
    """Method names in identifiers (any part between underscores, any case) and in string literals
    (docstrings included, lower case as users type them: `"gptq"`, `--method awq`, `gptq:w4g128`).
    Comments are prose and not checked."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and set(tok.string.lower().split("_")) & set(NAMES):
            found.append(f"line {tok.start[0]}: identifier {tok.string}")
        elif tok.type in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)) and IN_STRING.search(tok.string):
            found.append(f"line {tok.start[0]}: string {tok.string[:60]}")
    return found


def test_the_check_sees_what_it_looks_for():
    assert mentions('x = "gptq"\n') and mentions("if s.method in BNB_METHODS: pass\n") and mentions("y = 'nf4:w4'\n")
    assert mentions('"""Quantize with --method awq."""\n') and mentions("def rtn_codes(): pass\n")
    assert not mentions("# gptq in a comment\nx = 'GPTQ prose'\ny = 'rtn_fallback'\n")


def test_no_module_outside_methods_names_a_method():
    assert len(WATCHED) > 10
    found = {str(p.relative_to(ROOT)): m for p in WATCHED if (m := mentions(p.read_text(encoding="utf-8")))}
    assert not found, found


def test_import_layers_hold():
    """`lint-imports` with the contracts of pyproject.toml (no cycle, nothing low importing high)."""
    import subprocess
    import sys

    repo = ROOT.parent
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--config", str(repo / "pyproject.toml"), "--no-cache"], cwd=repo,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
