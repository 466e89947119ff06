"""The ``heald`` command.

Subcommands are registered lazily by ``"module:function"`` (as uvicorn does for apps) so that
``heald --version`` or ``heald check`` never pay for importing numpy, aiomqtt or the model code.
Each registrar receives its argparse sub-parser and sets ``handler="module:function"``; the
handler takes the parsed arguments and returns the exit code.

Exit codes: 0 ok, 1 failure, 2 bad input (config, playbook, arguments), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from agent import __version__
from agent.errors import HealdError, InputError

# (command, one-line help, "module:registrar")
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("run", "run the daemon in the foreground (for systemd)", "agent.runtime.cli:add_run"),
    ("check", "validate config, playbooks and model; exit 2 listing every problem",
     "agent.runtime.cli:add_check"),
    ("once", "take one full sample of this host and print it", "agent.runtime.cli:add_once"),
    ("model", "train, inspect and evaluate the anomaly model", "agent.score.cli:add_model"),
    ("install-units", "install the systemd units for a pip/pipx install",
     "agent.runtime.units:add_install_units"),
    ("audit", "verify the hash-chained audit log", "agent.act.cli:add_audit"),
    ("fleet", "talk to the coordinator: ls, show, approve, deny, run, silence", "agent.fleet_cli:add_fleet"),
)


def resolve(spec: str) -> Callable[..., Any]:
    """Import ``"module:attr"`` and return the attribute."""
    module, _, attr = spec.partition(":")
    obj: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return obj


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heald",
        description="heald: self-healing infrastructure agent.",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad input (config, playbook, arguments).",
    )
    parser.add_argument("--version", action="version", version=f"heald {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, registrar in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        resolve(registrar)(p)
    return parser


# structlog imports these opportunistically, for pretty console tracebacks the daemon never
# shows (it logs JSON): rich alone costs ~14 MiB of RSS and 80 ms of start-up where it happens to
# be installed (typer pulls it in). Marking them absent before structlog is first imported keeps
# the per-node footprint independent of what else shares the environment.
_NEVER_IMPORT = ("rich", "better_exceptions")


def main(argv: Sequence[str] | None = None) -> int:
    for name in _NEVER_IMPORT:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None = "not installed"
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = resolve(args.handler)(args)
    except InputError as exc:
        for problem in exc.problems:
            print(f"heald: {problem}", file=sys.stderr)
        return 2
    except HealdError as exc:
        print(f"heald: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
