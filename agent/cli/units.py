"""``heald install-units``: install the systemd units for a pip/pipx installation.

The plan (which files, rewritten how, new or changed or kept) is :mod:`agent.runtime.units`;
this module is its flags and its report. It starts, enables and reloads nothing: it prints
the commands that do, for the operator to run with consent.
"""

from __future__ import annotations

import argparse
import json

from agent.cli.base import out
from agent.runtime.units import DEFAULT_LIBEXEC, DEFAULT_PREFIX, NEXT_STEPS, InstallOptions, plan, write


def add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="DIR",
                   help=f"where the .service files go (default {DEFAULT_PREFIX})")
    p.add_argument("--libexec-dir", default=DEFAULT_LIBEXEC, metavar="DIR",
                   help=f"where the root-only heald-action helper goes (default {DEFAULT_LIBEXEC})")
    p.add_argument("--executable", default=None, metavar="PATH",
                   help="the heald executable ExecStart= should run (default: this installation's); "
                        "with --root it is looked up below that directory")
    p.add_argument("--coordinator", action=argparse.BooleanOptionalAction, default=None,
                   help="also install heald-coordinator.service (default: when heald-coordinator "
                        "is installed beside heald)")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="install below this directory instead of / (staging, tests)")
    p.add_argument("--dry-run", action="store_true", help="show what would be written; write nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_install_units)


def cmd_install_units(args: argparse.Namespace) -> int:
    options = InstallOptions(prefix=args.prefix, libexec_dir=args.libexec_dir, executable=args.executable,
                             coordinator=args.coordinator, root=args.root)
    planned = plan(options)
    if not args.dry_run:
        write(planned)
    if args.json:
        out(json.dumps({
            "dry_run": args.dry_run,
            "files": [{"source": p.source, "dest": str(p.dest), "mode": f"{p.mode:04o}", "status": p.status}
                      for p in planned],
            "next": list(NEXT_STEPS),
        }, indent=2))
        return 0
    verb = "would write" if args.dry_run else "wrote"
    width = max(len(str(p.dest)) for p in planned)
    for p in planned:
        status = f"{verb} ({p.status})" if p.status in ("new", "updated") else p.status
        out(f"{p.dest!s:<{width}}  {p.mode:04o}  {status}")
    if args.dry_run:
        for p in planned:
            if p.source.endswith(".service"):
                for line in p.content.decode().splitlines():
                    if line.startswith("Exec"):
                        out(f"  {p.source}: {line}")
    out("\nNothing was started or enabled. When you are ready, as root:")
    for step in NEXT_STEPS:
        out(f"  {step}")
    return 0
