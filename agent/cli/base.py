"""What every heald command-line front end shares: exit codes, error reporting, logging setup,
plain-text tables.

Both ``heald`` (:mod:`agent.cli.main`) and ``heald-coordinator`` (:mod:`coordinator.cli`) run
their handlers through :func:`run_handler`, so a problem reaches the operator the same way
from either: one line per problem, prefixed with the program name, never a traceback, and
the same exit codes:

    0 ok, 1 failure, 2 bad input (config, playbook, arguments), 130 interrupted.

This module imports only the standard library and :mod:`agent.errors` at import time (the
coordinator may import it; structlog is imported when logging is configured), so that
importing it costs nothing and blocks :data:`NEVER_IMPORT` in time.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Final, Literal, TextIO

from agent.errors import HealdError, InputError

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_INTERRUPTED: Final = 130
EXIT_CODES_EPILOG: Final = (
    "Exit codes: 0 ok, 1 failure, 2 bad input (config, playbook, arguments), 130 interrupted."
)

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
_LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
}
#: syslog priorities (RFC 5424; what ``journalctl -p`` filters on) of structlog's level names.
SYSLOG_PRIORITY: Final[dict[str, int]] = {
    "critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7, "notset": 7,
}

# structlog imports these opportunistically, for pretty console tracebacks that heald never
# shows (it logs JSON): rich alone costs ~14 MiB of RSS and 80 ms of start-up where it happens
# to be installed (typer pulls it in). Marking them absent before structlog is first imported
# keeps the footprint independent of what else shares the environment. colorama (Windows
# consoles: structlog has its own ANSI codes) and greenlet (structlog's deprecated threadlocal;
# heald runs no greenlets) are another 1.6 MiB.
NEVER_IMPORT: Final = ("rich", "better_exceptions", "colorama", "greenlet")


def block_optional_imports() -> None:
    """Mark :data:`NEVER_IMPORT` as not installed (call before anything imports structlog)."""
    for name in NEVER_IMPORT:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None = "not installed"


def run_handler(prog: str, handler: Callable[[], int], *, stderr: TextIO | None = None) -> int:
    """Run a command handler and map what it raises to the exit code and one line per problem."""
    err = stderr or sys.stderr
    try:
        return handler()
    except InputError as exc:
        for problem in exc.problems:
            err.write(f"{prog}: {problem}\n")
        return EXIT_BAD_INPUT
    except HealdError as exc:
        err.write(f"{prog}: {exc}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def on_journal(stream: TextIO) -> bool:
    """Is ``stream`` systemd's journal stream? systemd sets ``$JOURNAL_STREAM`` to ``DEV:INODE`` of
    the stdout/stderr it connects to journald; a pipe or file put in their place does not match."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(want) and want == f"{st.st_dev}:{st.st_ino}"


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["json", "console"]:
    """``auto``: the console renderer for a person at a terminal, JSON lines for anything else."""
    if fmt != "auto":
        return fmt
    try:
        tty = stream.isatty()
    except (OSError, ValueError, AttributeError):
        tty = False
    return "console" if tty and not on_journal(stream) else "json"


def _add_priority(_logger: object, method: str,
                  event: MutableMapping[str, object]) -> MutableMapping[str, object]:
    """Every record gets ``priority``: its syslog number (3 error, 4 warning, 6 info, 7 debug)."""
    level = str(event.get("level", method)).lower()
    event["priority"] = SYSLOG_PRIORITY.get(level, 6)
    return event


class _JournalJSON:
    """JSON lines with ``<N>`` in front, for systemd's journal stream: journald reads the prefix as
    the record's priority and strips it (systemd.exec(5) ``SyslogLevelPrefix=``, on by default,
    and so in heald.service), so ``journalctl -p err -u heald`` shows heald's errors only."""

    def __init__(self, render: Callable[..., str | bytes]) -> None:
        self._render = render

    def __call__(self, logger: object, method: str, event: MutableMapping[str, object]) -> str:
        line = self._render(logger, method, event)
        text = line.decode() if isinstance(line, bytes) else line
        return f"<{event.get('priority', 6)}>{text}"


def configure_logging(level: LogLevel = "info", fmt: LogFormat = "auto", *, stream: TextIO | None = None,
                      bind: Mapping[str, str] | None = None, cache_loggers: bool = False) -> None:
    """structlog for a heald process: JSON lines (journald stores stdout) or a console renderer.

    ``auto`` picks the console renderer when ``stream`` is a terminal and JSON lines otherwise
    (:func:`resolve_format`). Every JSON record carries ``priority``, its syslog number; lines
    written to systemd's journal stream start with ``<N>``, the prefix journald takes as the
    record's priority (``journalctl -p err``). Daemons log to stdout; one-shot commands whose
    stdout is their output (``--json``, tables) pass ``stream=sys.stderr``. ``bind`` adds context
    to every line (the coordinator's ``replica``). ``cache_loggers`` freezes the configuration
    into each logger on first use: a little faster, for a process that configures logging exactly
    once (the coordinator). Libraries that log through the standard library (paho, aiomqtt,
    aiohttp) go to stderr at warning and above.
    """
    import structlog  # noqa: PLC0415 - after block_optional_imports(), and only when logging is wanted

    target = stream or sys.stdout
    resolved = resolve_format(fmt, target)
    if resolved == "json":
        plain = structlog.processors.JSONRenderer()
        renderer: structlog.typing.Processor = _JournalJSON(plain) if on_journal(target) else plain
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *([_add_priority] if resolved == "json" else []),  # a person reads the level itself
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=target),
        cache_logger_on_first_use=cache_loggers,
    )
    if bind:
        structlog.contextvars.bind_contextvars(**bind)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def quiet_logging() -> None:
    """For one-shot commands: warnings and errors only, on stderr (stdout is the command's output)."""
    configure_logging("warning", "console", stream=sys.stderr)


def out(text: str = "") -> None:
    """One line (or block) of a command's output on stdout."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, rule: bool = False) -> str:
    """Left-aligned columns two spaces apart; ``rule`` underlines the header with dashes."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
