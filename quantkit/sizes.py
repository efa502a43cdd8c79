"""Byte sizes as users type them ("2GB", "500MB", "1.5GiB", "123456") and as we print them."""

from __future__ import annotations

import re

from quantkit.errors import QuantkitError

# Decimal units as transformers' max_shard_size reads them ("2GB" = 2 * 10**9), binary ones for the rest.
UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes of "2GB" / "500MB" / "2GiB" / "1048576"; a one-line QuantkitError naming `what` otherwise."""
    if isinstance(text, int):
        if text <= 0:
            raise QuantkitError(f"{what} must be positive, got {text}")
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS:
        raise QuantkitError(f"{what} {text!r} is not a size; write it like 2GB, 500MB, 2GiB or a number of bytes")
    value = int(float(m.group(1)) * UNITS[unit])
    if value <= 0:
        raise QuantkitError(f"{what} must be positive, got {text!r}")
    return value


def human(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
