"""The ``heald`` command: the argument parser and the dispatch to one module per command group.

Each command group's module has ``add(parser)``, which declares its arguments and sets
``handler`` to the function that runs it; the handler takes the parsed arguments and returns
the exit code. Handlers import what they need when they run, so ``heald --version`` or
``heald check`` never pay for numpy, aiomqtt or the model code; and :func:`main` imports only the
module of the command it runs (the others' parsers stay bare: ``heald --help`` lists them all
from :data:`COMMANDS`), so the long-running ``heald run`` holds none of the other commands' code
and imports (``heald fleet``'s urllib.request, http.client and email alone are ~1.2 MiB of RSS).

Exit codes: 0 ok, 1 failure, 2 bad input (config, playbook, arguments), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Final

from agent import __version__
from agent.cli.base import EXIT_CODES_EPILOG, block_optional_imports, run_handler

# (command, one-line help, "module:function": agent.cli.<module>'s add(parser) for it)
COMMANDS: Final[tuple[tuple[str, str, str], ...]] = (
    ("run", "run the daemon in the foreground (for systemd)", "run:add"),
    ("check", "validate config, playbooks and model; exit 2 listing every problem", "check:add"),
    ("once", "take one full sample of this host and print it", "once:add"),
    ("model", "train, inspect and evaluate the anomaly model", "model:add"),
    ("install-units", "install the systemd units for a pip/pipx install", "units:add"),
    ("audit", "verify the hash-chained audit log", "audit:add"),
    ("fleet", "talk to the coordinator: ls, show, approve, deny, run, silence, unsilence", "fleet:add"),
    ("status", "this node's playbooks, guards, model and links (works with the daemon stopped)",
     "local:add_status"),
    ("breaker", "reset a playbook's open circuit breakers on this node (root)", "local:add_breaker"),
    ("silence", "hold this node's automatic playbook runs for a while (root)", "local:add_silence"),
    ("unsilence", "lift this node's silence (root)", "local:add_unsilence"),
    ("run-playbook", "run a playbook on this node now, as a dry run unless --enforce (root)",
     "local:add_run_playbook"),
    ("replay", "what the playbooks would have done on recorded samples (dry-run, nothing executed)",
     "replay:add"),
)


def command_adder(spec: str) -> Callable[[argparse.ArgumentParser], None]:
    """The ``add(parser)`` a :data:`COMMANDS` entry names, its module imported now."""
    module, _, func = spec.partition(":")
    add: Callable[[argparse.ArgumentParser], None] = getattr(
        importlib.import_module(f"agent.cli.{module}"), func)
    return add


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, every command is listed but only that one's
    arguments are declared (and only its module imported)."""
    parser = argparse.ArgumentParser(
        prog="heald",
        description="heald: self-healing infrastructure agent.",
        epilog=EXIT_CODES_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"heald {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, spec in COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            command_adder(spec)(command)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs (the top-level parser has only options before it), or None."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if any(first == name for name, _, _ in COMMANDS) else None


def main(argv: Sequence[str] | None = None) -> int:
    block_optional_imports()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(chosen_command(argv)).parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return run_handler("heald", lambda: handler(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
