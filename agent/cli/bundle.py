"""``heald fleet bundle``: the coordinator's bundle registry (ls, publish, shadow, promote, rollback).

A bundle is a playbook set: ``publish DIR`` sends every ``*.yaml`` of DIR with a version and a
reason; the coordinator hashes and signs it. ``shadow`` evaluates a version beside the live set on
every node (decisions reported, never executed), ``promote`` makes it live on a share of the nodes
(a canary, rolled back automatically beyond ``--margin`` runs/hour over the others within
``--window``) or on all, ``rollback`` undoes the last step.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from pathlib import Path
from typing import Any, Protocol

from agent.cli.base import out, table
from agent.decide.units import parse_duration
from agent.errors import InputError, Problem


class _Client(Protocol):
    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any: ...


def add(sub: Any) -> argparse.ArgumentParser:
    what = "the coordinator's signed bundles (playbook sets): ls, publish, shadow, promote, rollback"
    p: argparse.ArgumentParser = sub.add_parser("bundle", help=what, description=what)
    verbs = p.add_subparsers(dest="bundle_command", metavar="VERB", required=True)
    verbs.add_parser("ls", help="bundles, the live version, the shadow and the canary")
    pub = verbs.add_parser("publish", help="publish DIR's *.yaml playbooks as VERSION")
    pub.add_argument("dir", type=Path)
    pub.add_argument("--version", required=True, dest="bundle_version")
    pub.add_argument("--reason", required=True)
    sh = verbs.add_parser("shadow", help="evaluate VERSION beside the live set on every node ('off' stops)")
    sh.add_argument("bundle_version", metavar="VERSION")
    pro = verbs.add_parser("promote", help="make VERSION live: on --node/--share nodes as a canary, or all")
    pro.add_argument("bundle_version", metavar="VERSION")
    pro.add_argument("--node", action="append", default=[], help="a canary node (repeatable)")
    pro.add_argument("--share", type=float, default=1.0, help="share of the nodes, 0..1 (default 1: all)")
    pro.add_argument("--window", default="1h", help="how long the canary is watched (default 1h)")
    pro.add_argument("--margin", type=float, default=10.0,
                     help="runs/hour over the other nodes past which the canary is rolled back (default 10)")
    rb = verbs.add_parser("rollback", help="the canary nodes back to the live version, else the previous one")
    rb.add_argument("--reason", default="operator")
    for v in verbs.choices.values():
        v.add_argument("--json", action="store_true", dest="json_sub", help=argparse.SUPPRESS)
    return p


def _read(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        raise InputError([Problem(str(directory), "", "not a directory")])
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.iterdir())
             if p.suffix in (".yaml", ".yml") and p.is_file()}
    if not files:
        raise InputError([Problem(str(directory), "", "no *.yaml playbooks in it")])
    return files


def _print_ls(data: dict[str, Any]) -> None:
    state = data["state"]
    rows = [[m["version"], m["sha256"][:12], m["publisher"], m["reason"]] for m in data["items"]]
    out(table(["VERSION", "SHA256", "PUBLISHER", "REASON"], rows))
    canary = state.get("canary")
    out(f"live: {state['live'] or '(configured playbooks)'}  shadow: {state['shadow'] or '-'}  canary: "
        + (f"{canary['bundle']} on {', '.join(canary['nodes'])}" if canary else "-"))


def handle(client: _Client, args: argparse.Namespace, *, as_json: bool) -> int:
    verb = args.bundle_command
    quote = urllib.parse.quote
    if verb == "ls":
        data = client.request("GET", "/api/bundles")
        out(json.dumps(data, indent=2)) if as_json else _print_ls(data)
        return 0
    if verb == "publish":
        body = {"version": args.bundle_version, "files": _read(args.dir), "reason": args.reason}
        data = client.request("POST", "/api/bundles", body)
        out(json.dumps(data, indent=2) if as_json else f"published {data['version']} sha256 {data['sha256']}")
        return 0
    if verb == "shadow":
        path = "/api/bundles/shadow/off" if args.bundle_version == "off" else \
            f"/api/bundles/{quote(args.bundle_version, safe='')}/shadow"
        data = client.request("POST", path, {})
    elif verb == "promote":
        if not 0 < args.share <= 1:
            raise InputError([Problem("--share", "", "must be in (0, 1]")])
        try:
            window = parse_duration(args.window)
        except ValueError as exc:
            raise InputError([Problem("--window", "", str(exc))]) from None
        data = client.request("POST", f"/api/bundles/{quote(args.bundle_version, safe='')}/promote",
                              {"nodes": args.node, "share": args.share, "window_s": window,
                               "margin_per_h": args.margin})
    else:
        data = client.request("POST", "/api/bundles/rollback", {"reason": args.reason})
    if as_json:
        out(json.dumps(data, indent=2))
    else:
        canary = data.get("canary")
        out(f"live: {data['live'] or '(configured playbooks)'}  shadow: {data['shadow'] or '-'}  canary: "
            + (f"{canary['bundle']} on {', '.join(canary['nodes'])}" if canary else "-"))
    return 0
