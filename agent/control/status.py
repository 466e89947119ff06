"""What ``heald status`` shows: per playbook and per target, the guards, the model, the links.

Two sources give the same shape. With the daemon running, :func:`snapshot` reads its live state
(the engine, the silence, the reporter) and the local control socket (:mod:`agent.control.local`)
hands it out. With the daemon stopped, ``heald status`` builds what the state directory still
holds through the same :func:`guard_rows` and :func:`last_runs`: the persisted guard counters
(``playbooks.json``) and the last runs in the audit log.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.decide.guards import TargetState, cooldown_s
from agent.decide.model import Playbook

if TYPE_CHECKING:
    from agent.act.engine import Engine
    from agent.control.silence import Silence
    from agent.report.transport import Reporter

#: How much of the audit log's end :func:`last_runs` reads (the last runs are at the end).
AUDIT_TAIL_BYTES = 256 * 1024


def guard_rows(playbooks: Mapping[str, Playbook], modes: Mapping[str, str], states: Mapping[str, TargetState],
               now: float, *, running: Mapping[str, str] | None = None, held: Mapping[str, str] | None = None,
               holds: Mapping[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """One row per playbook (``targets``: one per target with guard state), with ``armed``: whether
    a trigger would start a run now (mode not off, nothing holding the whole playbook)."""
    running, held, holds = running or {}, held or {}, holds or {}
    rows = []
    for name, playbook in sorted(playbooks.items()):
        targets = []
        for key, state in sorted((k, s) for k, s in states.items() if s.playbook == name):
            cooling = None
            if state.last_end is not None and state.last_end + cooldown_s(playbook, state) > now:
                cooling = state.last_end + cooldown_s(playbook, state)
            targets.append({
                "target": key,
                "running": running.get(key),
                "held": held.get(key),
                "cooldown_until": cooling,
                "breaker_open": state.breaker_open_since is not None,
                "breaker_open_since": state.breaker_open_since,
                "consecutive_failures": state.consecutive_failures,
                "total_runs": state.total_runs,
                "last_outcome": state.last_outcome,
                "last_end": state.last_end,
            })
        mode = modes.get(name, playbook.mode)
        playbook_holds = list(holds.get(name, []))
        rows.append({
            "playbook": name,
            "mode": mode,
            "armed": mode != "off" and not playbook_holds,
            "holds": playbook_holds,
            "running": [t["running"] for t in targets if t["running"]],
            "breaker_open": [t["target"] for t in targets if t["breaker_open"]],
            "cooldown_until": max((t["cooldown_until"] or 0.0 for t in targets), default=0.0) or None,
            "targets": targets,
        })
    return rows


def last_runs(audit_path: Path, limit: int = 10) -> list[dict[str, Any]]:
    """The last ``limit`` finished runs in the audit log (newest last): when, what, the verdict."""
    try:
        with audit_path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - AUDIT_TAIL_BYTES))
            tail = f.read()
    except OSError:
        return []
    runs = []
    for raw in tail.split(b"\n"):
        try:
            entry = json.loads(raw)
            record = entry["record"]
        except (ValueError, KeyError, TypeError):
            continue  # the first line cut by the tail, or a torn one
        if not isinstance(record, dict) or record.get("type") not in ("run.end", "run.abandoned"):
            continue
        runs.append({
            "ts": entry.get("ts"), "playbook": record.get("playbook"), "target": record.get("target", ""),
            "run_id": record.get("run_id"), "outcome": record.get("outcome") or "abandoned",
            "dry_run": bool(record.get("dry_run")),
        })
    return runs[-limit:]


async def live_status(engine: Engine, silence: Silence | None, reporter: Reporter | None,
                      *, model_enabled: bool = True) -> dict[str, Any]:
    """The running daemon's view (``heald status`` over the control socket): the state on the event
    loop, the last runs read from the audit log in a thread."""
    data = snapshot(engine, silence, reporter)
    data["model"]["enabled"] = model_enabled
    data["last_runs"] = await asyncio.to_thread(last_runs, engine.audit.path)
    return data


def snapshot(engine: Engine, silence: Silence | None, reporter: Reporter | None) -> dict[str, Any]:
    """The running daemon's state, but for ``last_runs`` (see :func:`live_status`)."""
    now = time.time()
    silenced = silence is not None and silence.holds(now)
    model = engine.model()
    cold = model.get("cold") is not False  # no risk yet counts as cold
    running: dict[str, str] = {}
    held: dict[str, str] = {}
    for row in engine.status():
        for t in row["targets"]:
            if t["running"]:
                running[t["target"]] = t["running"]
            if t["held"]:
                held[t["target"]] = t["held"]
    holds: dict[str, list[str]] = {}
    for name, playbook in engine.playbooks.items():
        reasons = ["silenced"] if silenced else []
        if playbook.model_driven and playbook.guards.cold_start == "hold" and cold:
            reasons.append("cold-start")
        if not engine.connected and playbook.guards.disconnected == "hold":
            reasons.append("disconnected")
        holds[name] = reasons
    modes = {name: engine.effective_mode(pb) for name, pb in engine.playbooks.items()}
    mqtt: dict[str, Any] = {"enabled": reporter is not None}
    if reporter is not None:
        mqtt.update(connected=reporter.connected, backlog=reporter.backlog, queued=reporter.queued,
                    spool_bytes=reporter.spool.used_bytes, spool_degraded=reporter.spool.degraded,
                    spool_last_seq=reporter.spool.last_seq)
    return {
        "daemon": "running",
        "node": engine.node,
        "pid": os.getpid(),
        "time": now,
        "silenced_until": silence.until if silenced and silence is not None else None,
        "model": model,
        "playbooks": guard_rows(engine.playbooks, modes, engine.store.data.targets, now, running=running,
                                held=held, holds=holds),
        "approvals": engine.pending_approvals(),
        "last_runs": [],
        "mqtt": mqtt,
    }
