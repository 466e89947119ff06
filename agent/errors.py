"""The one exception hierarchy of heald.

Every error a user can cause (bad config, bad playbook, bad payload, bad command) is a
:class:`HealdError` whose message names the file, line and field at fault; the CLI prints it
and exits 2 instead of showing a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class HealdError(Exception):
    """Root of every error heald raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input file, located as precisely as we can."""

    file: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" [{self.key}]" if self.key else ""
        return f"{where}:{key} {self.message}"


_TOML_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_TOML_ASSIGN = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.\-" ]+?)\s*=""")


def toml_key_lines(text: str) -> dict[str, int]:
    """Best-effort map of dotted key -> line number in a TOML document, for :attr:`Problem.line`.

    tomllib does not expose positions, so this scans table headers and ``key =`` lines; every
    prefix of a table header gets the header's line. It only feeds error messages: a key it
    cannot place is reported without a line. Shared by the agent's and the coordinator's config
    loaders.
    """
    lines: dict[str, int] = {}
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _TOML_HEADER.match(line):
            table = [part.strip().strip("\"'") for part in m.group(1).split(".")]
            for i in range(1, len(table) + 1):
                lines.setdefault(".".join(table[:i]), number)
            continue
        if m := _TOML_ASSIGN.match(line):
            parts = [part.strip().strip("\"'") for part in m.group(1).split(".")]
            lines.setdefault(".".join([*table, *parts]), number)
    return lines


class InputError(HealdError):
    """Bad user input: one or more located problems. Exit code 2."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(InputError):
    """The agent configuration is invalid."""


class PlaybookError(InputError):
    """A playbook is invalid."""


class CollectorUnavailable(HealdError):
    """A collector cannot run on this host (no NVML, no /proc/pressure, ...)."""


class WireError(HealdError):
    """A wire message is malformed, oversized or of an unknown version."""


class ModelError(HealdError):
    """A model artifact cannot be loaded or does not fit the feature schema."""
