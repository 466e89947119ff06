"""``heald fleet ...``: talk to the coordinator's JSON API.

    heald fleet ls [--site S] [--label k=v] [--state online|offline|alert|silenced] [--sort risk] [--limit N]
    heald fleet show NODE
    heald fleet approve ID | deny ID
    heald fleet run NODE PLAYBOOK
    heald fleet silence NODE DURATION        (90s, 15m, 2h, 1d)
    heald fleet unsilence NODE

The coordinator URL and token come from ``--url``/``--token``, else ``HEALD_COORDINATOR_URL`` /
``HEALD_COORDINATOR_TOKEN``, else ``/etc/heald/fleet.toml`` (``url = ...``, ``token = ...`` or
``token_file = ...``). Human tables by default, ``--json`` for scripts. Exit codes: 0 ok,
1 failure (coordinator unreachable, server error), 2 bad input (arguments, unknown node/approval,
request refused as invalid).

Uses only the standard library (urllib): the agent stays free of HTTP client dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from agent.cli.base import out, table
from agent.decide.units import parse_duration
from agent.errors import HealdError, InputError, Problem

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONFIG = Path("/etc/heald/fleet.toml")


class FleetError(HealdError):
    """The coordinator could not be reached or answered with a server error (exit 1)."""


def _bad(key: str, message: str) -> InputError:
    return InputError([Problem(file="heald fleet", key=key, message=message)])


def silence_seconds(text: str) -> float:
    """``heald fleet silence``'s DURATION: the playbooks' duration grammar (90s, 15m, 2h, 1d), or
    a bare number of seconds; positive."""
    text = text.strip().lower()
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise _bad("DURATION", f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 1d)") from None
    if seconds <= 0:
        raise _bad("DURATION", "duration must be positive")
    return seconds


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", help=f"coordinator base URL (env HEALD_COORDINATOR_URL; default {DEFAULT_URL})"
    )
    parser.add_argument("--token", help="API token (env HEALD_COORDINATOR_TOKEN; or token in fleet.toml)")
    parser.add_argument("--fleet-config", type=Path, default=None, help=f"default {DEFAULT_CONFIG}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")
    sub = parser.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)
    ls = sub.add_parser("ls", help="list nodes (risk first)")
    ls.add_argument("--site", default="")
    ls.add_argument("--label", default="", help="key=value")
    ls.add_argument("--state", default="", choices=["", "online", "offline", "alert", "silenced"])
    ls.add_argument(
        "--sort",
        default="risk",
        choices=["risk", "node", "site", "last_seen", "online", "version", "incidents"],
    )
    ls.add_argument("--asc", action="store_true", help="ascending order")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--offset", type=int, default=0)
    show = sub.add_parser("show", help="one node: state, risk, recent actions")
    show.add_argument("node")
    for verb in ("approve", "deny"):
        p = sub.add_parser(verb, help=f"{verb} a pending approval (signed command to the node)")
        p.add_argument("id")
    run = sub.add_parser("run", help="ask a node to run a playbook (signed command)")
    run.add_argument("node")
    run.add_argument("playbook")
    what = "hold a node's automatic playbook runs for DURATION (90s, 15m, 2h, 1d)"
    silence = sub.add_parser("silence", help=what, description=what + " (signed command)")
    silence.add_argument("node")
    silence.add_argument("duration")
    what = "lift a node's silence: its automatic playbook runs resume (signed command)"
    unsilence = sub.add_parser("unsilence", help=what, description=what)
    unsilence.add_argument("node")
    # every subparser repeats the output flags so `heald fleet ls --json` works too
    for p in (
        ls,
        show,
        run,
        silence,
        unsilence,
        *[a for a in sub.choices.values() if a.prog.endswith(("approve", "deny"))],
    ):
        p.add_argument("--json", action="store_true", dest="json_sub", help=argparse.SUPPRESS)
    parser.set_defaults(handler=handle)


class Client:
    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - the URL scheme is checked to be http(s)
            self.url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - http(s) checked  # noqa: S310
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    message = json.loads(exc.read()).get("error", exc.reason)
                except (ValueError, AttributeError):
                    message = exc.reason
            if exc.code in (400, 404, 409):
                raise _bad(path, f"{message} (HTTP {exc.code})") from None
            if exc.code in (401, 403):
                raise FleetError(
                    f"coordinator refused the credentials: {message} (HTTP {exc.code}); "
                    "check --token / HEALD_COORDINATOR_TOKEN"
                ) from None
            raise FleetError(f"coordinator error: {message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FleetError(f"cannot reach the coordinator at {self.url}: {reason}") from None


def _settings(args: argparse.Namespace) -> tuple[str, str]:
    cfg: dict[str, Any] = {}
    path: Path | None = args.fleet_config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            cfg = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError([Problem(str(path), "", f"cannot read: {exc.strerror}")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError([Problem(str(path), "", f"not valid TOML: {exc}")]) from None
    url = args.url or os.environ.get("HEALD_COORDINATOR_URL") or cfg.get("url") or DEFAULT_URL
    token = args.token or os.environ.get("HEALD_COORDINATOR_TOKEN") or cfg.get("token") or ""
    if not token and cfg.get("token_file"):
        try:
            token = Path(str(cfg["token_file"])).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(
                [Problem(str(cfg["token_file"]), "token_file", f"cannot read: {exc.strerror}")]
            ) from None
    if not token:
        raise _bad(
            "--token",
            f"no API token: pass --token, set HEALD_COORDINATOR_TOKEN, or put token in {DEFAULT_CONFIG}",
        )
    if not str(url).startswith(("http://", "https://")):
        raise _bad("--url", f"{url!r} must start with http:// or https://")
    return str(url), str(token)


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _risk(n: dict[str, Any]) -> str:
    if n.get("anomaly") is None:
        return "cold" if n.get("cold") else "-"
    return f"{n['anomaly']:.2f}{' ALERT' if n.get('alert') else ''}"


def _print_ls(data: dict[str, Any]) -> None:
    rows = [
        [
            n["node"],
            n["site"],
            "online" if n["online"] else "offline",
            _risk(n),
            str(n.get("open_incidents") or ""),
            n.get("last_action") or "",
            n.get("agent_version") or "",
            _ago(n.get("last_seen")),
        ]
        for n in data["items"]
    ]
    out(table(["NODE", "SITE", "STATE", "RISK", "INCIDENTS", "LAST ACTION", "AGENT", "LAST SEEN"], rows))
    fleet = data["fleet"]
    out(
        f"\n{len(data['items'])} of {data['total']} shown; "
        f"fleet: {fleet['nodes']} nodes, {fleet['online']} online, {fleet['alert']} at risk"
    )


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _print_show(n: dict[str, Any]) -> None:
    silenced_until = float(n.get("silenced_until") or 0)
    labels = ", ".join(f"{k}={v}" for k, v in (n.get("labels") or {}).items()) or "-"
    top = ", ".join(f"{c['feature']} {c['share']:.0%}" for c in (n.get("explanation") or [])[:3]) or "-"
    pairs = [
        ("node", n["node"]),
        ("site", n["site"]),
        ("state", "online" if n["online"] else "offline"),
        ("host", n.get("hostname") or "-"),
        ("agent", n.get("agent_version") or "-"),
        ("labels", labels),
        ("last seen", _ago(n.get("last_seen"))),
        ("risk", _risk(n)),
        ("top contributors", top),
        ("open incidents", str(n.get("open_incidents") or 0)),
        ("last action", n.get("last_action") or "-"),
        ("silenced until", _when(silenced_until) if silenced_until > time.time() else "-"),
    ]
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        out(f"{k.ljust(width)}  {v}")
    pending = [a for a in n.get("approvals", []) if a["state"] == "pending"]
    if pending:
        out("\npending approvals:")
        out(table(["ID", "PLAYBOOK", "ACTION", "WHY"],
                  [[a["id"], a["playbook"], a["action"], a["message"]] for a in pending]))
    if n.get("actions"):
        out("\nrecent actions:")
        out(table(["WHEN", "PLAYBOOK", "ACTION", "PHASE", "OUTCOME", "ERROR"],
                  [[_ago(a["ts"]), a["playbook"], a["action"], a["phase"], a.get("outcome") or "",
                    a.get("error") or ""] for a in n["actions"][:15]]))


def handle(args: argparse.Namespace) -> int:
    url, token = _settings(args)
    client = Client(url, token, args.timeout)
    as_json = bool(args.json or getattr(args, "json_sub", False))
    cmd = args.fleet_command
    quote = urllib.parse.quote
    if cmd == "ls":
        if args.label and "=" not in args.label:
            raise _bad("--label", "must be key=value")
        if not 1 <= args.limit <= 10_000 or args.offset < 0:
            raise _bad("--limit", "limit must be 1..10000 and offset >= 0")
        query = {
            k: v
            for k, v in {
                "site": args.site,
                "label": args.label,
                "state": args.state,
                "sort": args.sort,
                "order": "asc" if args.asc else "desc",
                "limit": str(args.limit),
                "offset": str(args.offset),
            }.items()
            if v
        }
        data = client.request("GET", "/api/nodes?" + urllib.parse.urlencode(query))
        out(json.dumps(data, indent=2)) if as_json else _print_ls(data)
        return 0
    if cmd == "show":
        data = client.request("GET", f"/api/nodes/{quote(args.node, safe='')}")
        out(json.dumps(data, indent=2)) if as_json else _print_show(data)
        return 0
    if cmd in ("approve", "deny"):
        data = client.request("POST", f"/api/approvals/{quote(args.id, safe='')}/{cmd}", {})
        done = "approved" if cmd == "approve" else "denied"
        out(
            json.dumps(data, indent=2)
            if as_json
            else f"{done} {args.id}: signed command {data['command_id']} sent to {data['node']}"
        )
        return 0
    if cmd == "run":
        data = client.request(
            "POST", f"/api/nodes/{quote(args.node, safe='')}/run", {"playbook": args.playbook}
        )
        out(
            json.dumps(data, indent=2)
            if as_json
            else f"asked {args.node} to run {args.playbook}: signed command {data['command_id']}"
        )
        return 0
    if cmd == "silence":
        seconds = silence_seconds(args.duration)
        data = client.request(
            "POST", f"/api/nodes/{quote(args.node, safe='')}/silence", {"duration_s": seconds}
        )
        out(json.dumps(data, indent=2) if as_json else f"silenced {args.node} until {_when(data['until'])}")
        return 0
    if cmd == "unsilence":
        data = client.request("POST", f"/api/nodes/{quote(args.node, safe='')}/unsilence", {})
        out(
            json.dumps(data, indent=2)
            if as_json
            else f"lifted the silence on {args.node}: signed command {data['command_id']}"
        )
        return 0
    raise _bad("SUBCOMMAND", f"unknown fleet command {cmd!r}")  # pragma: no cover - argparse rejects it
