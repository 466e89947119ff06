"""Durations ("30s", "15m", "1.5h", "250ms") and byte sizes ("200M", "1GiB") as playbooks write them."""

from __future__ import annotations

import re

# A string without a unit is seconds, like a number: "heald fleet silence 90" reads its argument
# as a string. Playbooks never reach that case, their schema requires the unit in strings.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([KMGTkmgt]?)(i?[Bb]?)\s*$"


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``"30s"``/``"15m"``/``"1.5h"``/..., or a number of seconds (also as a string,
    ``"90"``). ValueError when malformed or negative; zero is allowed."""
    if isinstance(value, bool):
        raise TypeError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 30s, 15m, 2h, 1d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(value: str | int | float) -> int:
    """Bytes from ``"200M"``/``"1GiB"``/``"4096"`` (binary multiples). ValueError when malformed."""
    if isinstance(value, bool):
        raise TypeError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"negative size: {value!r}")
        return int(value)
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 4096, 200M, 1G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    for unit, mult in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= mult and seconds % mult == 0:
            return f"{seconds / mult:.0f}{unit}"
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:.3f}s"
