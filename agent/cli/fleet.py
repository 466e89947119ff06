"""``heald fleet ...``: talk to the coordinator's JSON API.

    heald fleet ls [--site S] [--label k=v] [--state online|offline|alert|silenced] [--sort risk] [--limit N]
    heald fleet show NODE
    heald fleet approve ID | deny ID
    heald fleet run NODE PLAYBOOK [--wait S]  (waits for the node's answer: exit 2 if it has no such playbook)
    heald fleet silence NODE DURATION        (90s, 15m, 2h, 1d: pauses ALL automatic remediation)
    heald fleet unsilence NODE
    heald fleet cost [--days N] [--top N]  (what the fleet's resources idled: agent/cli/fleet_cost.py)
    heald fleet demand [--hours N] [--bucket S]  (forecast against actual per site: agent/cli/fleet_cost.py)

The coordinator URL and token come from ``--url``/``--token``, else ``HEALD_COORDINATOR_URL`` /
``HEALD_COORDINATOR_TOKEN``, else ``/etc/heald/fleet.toml`` (``url = ...``, ``token = ...`` or
``token_file = ...``). Human tables by default, ``--json`` for scripts. Exit codes: 0 ok,
1 failure (coordinator unreachable, server error, the node failed the command or did not answer
within ``--wait``), 2 bad input (arguments, unknown node/approval, request refused as invalid, a
playbook the node does not have).

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

from agent.cli import bundle, fleet_cost
from agent.cli.base import out, table
from agent.decide.units import parse_duration
from agent.errors import HealdError, InputError, Problem

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONFIG = Path("/etc/heald/fleet.toml")


class FleetError(HealdError):
    """The coordinator could not be reached or answered with a server error (exit 1)."""


#: A command's final acknowledgement statuses (``agent.wire.AckStatus`` less ``accepted``).
FINAL_ACKS = frozenset({"done", "failed", "rejected", "expired"})


def _bad(key: str, message: str) -> InputError:
    # "fleet", not "heald fleet": the CLI prefixes every error line with the program name already
    return InputError([Problem(file="fleet", key=key, message=message)])


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
    what = "ask a node to run a playbook (signed command) and wait for its answer"
    run = sub.add_parser("run", help=what, description=what)
    run.add_argument("node")
    run.add_argument("playbook")
    run.add_argument(
        "--wait",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds to wait for the node's answer (exit 2 if it has no such playbook, 1 if it "
        "failed or did not answer); 0: send and return",
    )
    what = (
        "pause ALL automatic remediation on a node for DURATION (90s, 15m, 2h, 1d): no playbook "
        "starts on its own; operator runs and approvals still go through"
    )
    silence = sub.add_parser("silence", help=what, description=what + " (signed command)")
    silence.add_argument("node")
    silence.add_argument("duration")
    what = "lift a node's silence: its automatic playbook runs resume (signed command)"
    unsilence = sub.add_parser("unsilence", help=what, description=what)
    unsilence.add_argument("node")
    bundle.add(sub)
    cost = fleet_cost.add(sub)
    demand = fleet_cost.add_demand(sub)
    # every subparser repeats the output flags so `heald fleet ls --json` works too
    for p in (
        ls,
        show,
        run,
        silence,
        unsilence,
        cost,
        demand,
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
    if not n.get("online", True):  # an offline node's last risk is stale: never a current ALERT
        last = "" if n.get("anomaly") is None else f" (last {n['anomaly']:.2f})"
        return f"stale since {_ago(n.get('last_seen'))}{last}"
    if n.get("anomaly") is None:
        return "cold" if n.get("cold") else "-"
    return f"{n['anomaly']:.2f}{' ALERT' if n.get('alert') else ''}"


def _escalations(n: dict[str, Any]) -> str:
    """The fleet list's ESCALATIONS cell: how many are open, and the newest's reason and age."""
    count = int(n.get("open_escalations") or 0)
    if not count:
        return ""
    return f"{count}: {str(n.get('escalation') or '')[:40]} ({_ago(n.get('escalation_ts'))})"


def _print_ls(data: dict[str, Any]) -> None:
    rows = [
        [
            n["node"],
            n["site"],
            "online" if n["online"] else "offline",
            _risk(n),
            str(n.get("open_incidents") or ""),
            _escalations(n),
            n.get("last_action") or "",
            n.get("agent_version") or "",
            _ago(n.get("last_seen")),
        ]
        for n in data["items"]
    ]
    headers = ["NODE", "SITE", "STATE", "RISK", "INCIDENTS", "ESCALATIONS", "LAST ACTION", "AGENT",
               "LAST SEEN"]
    out(table(headers, rows))
    fleet = data["fleet"]
    out(
        f"\n{len(data['items'])} of {data['total']} shown; "
        f"fleet: {fleet['nodes']} nodes, {fleet['online']} online, {fleet['alert']} at risk, "
        f"{fleet.get('escalations', 0)} open escalations"
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
        out(table(["ID", "PLAYBOOK", "TARGET", "ACTION", "WHY"],
                  [[a["id"], a["playbook"], a.get("target") or "?", a["action"], a["message"]]
                   for a in pending]))
    escalations = [e for e in n.get("escalations", []) if e["state"] == "open"]
    if escalations:
        out("\nopen escalations:")
        out(table(["ID", "PLAYBOOK", "REASON", "RAISED"],
                  [[str(e["id"]), e["playbook"], e["reason"], _ago(e["ts"])] for e in escalations]))
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
        return _run(client, args, as_json=as_json)
    if cmd == "bundle":
        return bundle.handle(client, args, as_json=as_json)
    if cmd == "cost":
        return fleet_cost.handle(client, args, as_json=as_json)
    if cmd == "demand":
        return fleet_cost.handle_demand(client, args, as_json=as_json)
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


def _run(client: Client, args: argparse.Namespace, *, as_json: bool) -> int:
    """``fleet run``: send the signed command, then wait up to ``--wait`` seconds for the node's
    final answer. The coordinator cannot know a node's playbooks (they live on the node), so the
    node's ``failed: no playbook named ...`` is what says the name was wrong: exit 2."""
    if not 0 <= args.wait <= 3600:
        raise _bad("--wait", "must be 0..3600 seconds")
    node = urllib.parse.quote(args.node, safe="")
    data = client.request("POST", f"/api/nodes/{node}/run", {"playbook": args.playbook})
    command_id = str(data["command_id"])
    status, message = "sent", ""
    deadline = time.monotonic() + args.wait
    while args.wait and status not in FINAL_ACKS:
        commands = client.request("GET", f"/api/nodes/{node}/commands?limit=50")
        row = next((c for c in commands.get("items", []) if c.get("id") == command_id), None)
        if row is not None:
            status, message = str(row.get("status") or "sent"), str(row.get("status_message") or "")
        if status in FINAL_ACKS or time.monotonic() >= deadline:
            break
        time.sleep(0.3)
    if as_json:
        out(json.dumps(data | {"status": status, "message": message}, indent=2))
    if status in ("failed", "rejected", "expired"):
        if "no playbook named" in message:
            raise _bad("PLAYBOOK", f"{args.node} has no playbook {args.playbook!r}: {message}")
        raise FleetError(f"{args.node} answered {status} to run {args.playbook}: {message or '-'}")
    if args.wait and status != "done":
        raise FleetError(
            f"no answer from {args.node} within {args.wait:g}s (command {command_id}: {status}); "
            "it runs the playbook if it receives the command before the command expires"
        )
    if not as_json:
        said = "started" if status == "done" else "asked"
        out(f"{said} {args.playbook} on {args.node}: signed command {command_id} ({status})")
    return 0
