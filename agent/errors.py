"""The one exception hierarchy of heald.

Every error a user can cause (bad config, bad playbook, bad payload, bad command) is a
:class:`HealdError` whose message names the file, line and field at fault; the CLI prints it
and exits 2 instead of showing a traceback.
"""

from __future__ import annotations

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
