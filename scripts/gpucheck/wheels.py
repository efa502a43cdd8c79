"""Print the wheels of a folder that fit this interpreter, one a line; name the others on stderr."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename


def fitting(folder: Path) -> list[Path]:
    here = set(sys_tags())
    fit = []
    for wheel in sorted(folder.glob("*.whl")):
        if here & set(parse_wheel_filename(wheel.name)[3]):
            fit.append(wheel)
        else:
            sys.stderr.write(f"gpu-check: {wheel.name} does not fit this Python, not installed\n")
    return fit


if __name__ == "__main__":
    for w in fitting(Path(sys.argv[1])):
        sys.stdout.write(f"{w}\n")
