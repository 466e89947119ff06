"""``heald status`` and root's local controls: ``heald breaker reset``, ``heald silence``,
``heald unsilence``, ``heald run-playbook``.

They talk to the running daemon through its control socket (``<paths.runtime_dir>/control.sock``,
:mod:`agent.control.local`); no coordinator is involved. ``heald status`` also works with the
daemon stopped: it says so and shows what the state directory holds (the guard counters and the
last runs in the audit log). A control needs the daemon: unreachable, it exits 1.

Exit codes: 0 ok, 1 failure (the daemon unreachable, or it could not do it), 2 bad input (an
unknown playbook, a bad duration), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from agent.cli.base import out, table
from agent.cli.run import config_arg
from agent.errors import HealdError, InputError, Problem

TIMEOUT_S = 15.0


class Unreachable(HealdError):
    """The daemon's control socket cannot be reached (not running, or no permission)."""


def add_status(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_status)


def add_breaker(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="breaker_command", metavar="ACTION", required=True)
    r = sub.add_parser("reset", help="close a playbook's open circuit breakers (root)",
                       description="Close a playbook's open circuit breakers (all its targets, or one).")
    config_arg(r)
    r.add_argument("playbook")
    r.add_argument("--target", default="", help="only this target (its key, as `heald status` shows it)")
    r.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    r.set_defaults(handler=lambda a: _control(a, "breaker_reset",
                                              {"playbook": a.playbook, "target": a.target}))


def add_silence(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("duration", help="how long to hold automatic playbook runs: 90s, 15m, 2h, 1d")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.set_defaults(handler=cmd_silence)


def add_unsilence(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.set_defaults(handler=lambda a: _control(a, "unsilence", {}))


def add_run_playbook(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("playbook")
    p.add_argument("--enforce", action="store_true",
                   help="really act (default: a dry run that only records what each step would do)")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.set_defaults(handler=lambda a: _control(a, "run_playbook",
                                              {"playbook": a.playbook, "dry_run": not a.enforce}))


def cmd_silence(args: argparse.Namespace) -> int:
    from agent.cli.fleet import silence_seconds  # noqa: PLC0415 - the same DURATION grammar

    return _control(args, "silence", {"duration_s": silence_seconds(args.duration)})


# ---------------------------------------------------------------------------------- the socket

def _paths(args: argparse.Namespace) -> tuple[Path, Path, Any]:
    from agent.control.local import socket_path  # noqa: PLC0415
    from agent.runtime.config import load_config  # noqa: PLC0415

    settings = load_config(args.config).settings
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or settings.paths.state_dir
    return socket_path(settings.paths.runtime_dir), Path(state), settings


def request(path: Path, command: str, args: dict[str, Any], timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """One request to the daemon's control socket, its answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise Unreachable(f"daemon NOT running (no control socket at {path})") from None
    except ConnectionRefusedError:
        raise Unreachable(f"daemon NOT running (nobody listens on {path})") from None
    except PermissionError:
        raise Unreachable(f"daemon not reachable: no permission to use {path} (it is for root)") from None
    except OSError as exc:
        raise Unreachable(f"daemon not reachable at {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise HealdError(f"the daemon's answer on {path} is not JSON") from None
    if not isinstance(answer, dict):
        raise HealdError(f"the daemon's answer on {path} is not an object")
    return answer


def _control(args: argparse.Namespace, command: str, body: dict[str, Any]) -> int:
    path, _state, _settings = _paths(args)
    answer = request(path, command, body)
    status, message = str(answer.get("status")), str(answer.get("message", ""))
    if status == "rejected":
        raise InputError([Problem("daemon", str(body.get("playbook") or command), message)])
    if status != "done":
        raise HealdError(message or f"{command} failed")
    if args.json:
        out(json.dumps(answer, indent=1, default=str))
    else:
        out(message)
    return 0


# ---------------------------------------------------------------------------------- status

def offline_status(state_dir: Path, settings: Any, why: str) -> dict[str, Any]:
    """What the state directory holds while the daemon does not run."""
    import msgspec  # noqa: PLC0415

    from agent.control.status import guard_rows, last_runs  # noqa: PLC0415
    from agent.decide.guards import StateFile  # noqa: PLC0415
    from agent.decide.loader import load_playbooks  # noqa: PLC0415

    playbooks = {pb.name: pb for pb in load_playbooks(settings.playbooks)}
    force = settings.playbooks.force_mode
    modes = {name: "off" if "off" in (pb.mode, force) else force or pb.mode for name, pb in playbooks.items()}
    try:  # read only: never StateStore, which sets an unreadable file aside
        states = msgspec.json.decode((state_dir / "playbooks.json").read_bytes(), type=StateFile).targets
    except FileNotFoundError:
        states = {}
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        why = f"{why}; guard state unreadable: {exc}"
        states = {}
    spool = state_dir / "spool"
    try:
        spool_bytes: int | None = sum(f.stat().st_size for f in spool.iterdir() if f.is_file())
    except OSError:
        spool_bytes = None
    return {
        "daemon": "not running",
        "why": why,
        "node": settings.node.id,
        "state_dir": str(state_dir),
        "time": time.time(),
        "silenced_until": None,
        "model": None,
        "playbooks": guard_rows(playbooks, modes, states, time.time()),
        "approvals": [],
        "last_runs": last_runs(state_dir / "audit.jsonl"),
        "mqtt": {"enabled": settings.mqtt.enabled, "spool_bytes": spool_bytes},
    }


def cmd_status(args: argparse.Namespace) -> int:
    path, state_dir, settings = _paths(args)
    try:
        answer = request(path, "status", {})
        data = answer.get("result")
        if answer.get("status") != "done" or not isinstance(data, dict):
            raise HealdError(str(answer.get("message") or "the daemon did not answer status"))
    except Unreachable as exc:
        data = offline_status(state_dir, settings, str(exc))
    if args.json:
        out(json.dumps(data, indent=1, default=str))
    else:
        out(render_status(data))
    return 0


def _when(ts: object) -> str:
    if not isinstance(ts, int | float) or not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _state(row: dict[str, Any], target: dict[str, Any] | None) -> str:
    if row["mode"] == "off":
        return "off"
    if target is not None and target.get("held"):
        return f"held: {target['held']}"
    if row["holds"]:
        return "held: " + ", ".join(row["holds"])
    if target is not None and target.get("breaker_open"):
        return "breaker open"
    if target is not None and target.get("cooldown_until"):
        return "cooling down"
    return "armed"


def render_status(data: dict[str, Any]) -> str:
    lines = []
    if data.get("daemon") == "running":
        lines.append(f"heald on {data.get('node')}: daemon running (pid {data.get('pid')})")
    else:
        lines.append(f"heald on {data.get('node')}: {data.get('why')}")
        lines.append(f"showing what {data.get('state_dir')} holds")
    until = data.get("silenced_until")
    lines.append(f"silence:  automatic runs held until {_when(until)}" if until else "silence:  none")
    model = data.get("model")
    if isinstance(model, dict) and model.get("enabled") is False:
        lines.append("model:    off ([model] enabled = false): rules only")
    elif isinstance(model, dict):
        cold = model.get("cold")
        phase = "cold start (rules only)" if cold is not False else "fitted"
        lines.append(f"model:    {model.get('model_version') or 'none yet'}, {phase}, "
                     f"anomaly {model.get('anomaly') if model.get('anomaly') is not None else '-'}")
    else:
        lines.append("model:    unknown (the daemon is not running)")
    mqtt = data.get("mqtt") or {}
    if not mqtt.get("enabled"):
        link = "off (no coordinator)"
    elif "connected" in mqtt:
        link = (f"{'connected' if mqtt['connected'] else 'DISCONNECTED'}, backlog {mqtt.get('backlog')}, "
                f"spool {mqtt.get('spool_bytes')} B{' (DEGRADED)' if mqtt.get('spool_degraded') else ''}")
    else:
        link = f"on, spool {mqtt.get('spool_bytes')} B"
    lines.append(f"mqtt:     {link}")
    rows = []
    for row in data.get("playbooks", []):
        breakers = f"{len(row['breaker_open'])} open" if row["breaker_open"] else "-"
        rows.append([row["playbook"], row["mode"], _state(row, None), ", ".join(row["running"]) or "-",
                     _when(row["cooldown_until"]), breakers, "", ""])
        rows.extend(["  " + t["target"], "", _state(row, t), t["running"] or "-", _when(t["cooldown_until"]),
                     "OPEN" if t["breaker_open"] else "closed", str(t["consecutive_failures"]),
                     t["last_outcome"] or "-"] for t in row["targets"])
    lines += ["", table(["PLAYBOOK / TARGET", "MODE", "STATE", "RUNNING", "COOLING DOWN UNTIL", "BREAKER",
                         "FAILS", "LAST"], rows)]
    for a in data.get("approvals", []):
        lines.append(f"approval pending: {a['playbook']} on {a['target']} ({a['request_id']})")
    runs = data.get("last_runs", [])
    lines += ["", "last runs:" if runs else "last runs: none"]
    if runs:
        lines.append(table(["WHEN", "PLAYBOOK", "TARGET", "RUN", "VERDICT"],
                           [[_when(r["ts"]), str(r["playbook"]), str(r["target"] or "-"), str(r["run_id"]),
                             str(r["outcome"]) + (" (dry run)" if r["dry_run"] and r["outcome"] != "dry-run"
                                                  else "")] for r in runs]))
    return "\n".join(lines)
