"""``heald audit verify [PATH] [--json]``: check the hash-chained audit log.

Exit 0 when the chain is intact, 1 when it was tampered with (naming the first bad line),
2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.errors import InputError, Problem

DEFAULT_AUDIT = Path("/var/lib/heald/audit.jsonl")


def add(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = sub.add_parser(
        "verify",
        help="verify the hash chain; exit 1 naming the first bad line",
        description="Verify the hash-chained audit log (exit 0 intact, 1 tampered, 2 unreadable).",
    )
    v.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=DEFAULT_AUDIT,
        help=f"audit log (default {DEFAULT_AUDIT}; <state_dir>/audit.jsonl)",
    )
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(handler=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.act.audit import verify  # noqa: PLC0415 - `heald --help` stays light

    path: Path = args.path
    try:
        report = verify(path)
    except OSError as exc:
        raise InputError(
            [Problem(str(path), "", f"cannot read the audit log: {exc.strerror or exc}")]
        ) from None
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    elif report.ok:
        print(f"{path}: OK, {report.lines} entries, chain intact")
    else:
        print(f"{path}:{report.first_bad_line}: TAMPERED: {report.reason}", file=sys.stderr)
    return 0 if report.ok else 1
