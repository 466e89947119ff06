"""The start summary: one log record at every start saying what this daemon will do.

An operator reading the first lines of ``heald run`` (or ``journalctl -u heald``) learns the
playbooks' modes and what each could do to the host, where deletions may happen, which processes
are never touched, when the model's rules-only cold start ends, whether MQTT and /metrics are on,
and where the state lives -- before anything has happened.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from agent.decide.model import Playbook
from agent.runtime.config import Settings

#: What each action can do to the host, in words (every action of act/actions/REGISTRY).
EFFECTS: Final[dict[str, str]] = {
    "restart_unit": "restart systemd units",
    "stop_process": "stop processes",
    "signal_process": "signal processes",
    "renice": "renice processes",
    "restart_process": "restart processes",
    "cgroup_limit": "limit cgroups",
    "clean_paths": "delete files",
    "vacuum_journal": "vacuum the journal",
    "rotate_logs": "rotate logs",
    "drop_caches": "drop page caches",
    "gpu_reset": "reset GPUs",
    "gpu_drain": "drain GPUs",
    "run_command": "run commands",
    "cordon": "cordon the node",
    "notify": "notify only",
}
ENFORCE_HINT: Final = ("playbooks forced to dry-run: nothing is acted on. To enforce, run without "
                       "--dry-run, with [playbooks] force_mode = \"\" and no HEALD_PLAYBOOKS__FORCE_MODE")


def effective_mode(playbook: Playbook, force_mode: str) -> str:
    """The mode a playbook runs in under ``[playbooks] force_mode`` (as the engine decides it)."""
    if playbook.mode == "off" or force_mode == "off":
        return "off"
    return "dry-run" if force_mode == "dry-run" else playbook.mode


def playbook_rows(playbooks: Iterable[Playbook], force_mode: str) -> list[dict[str, Any]]:
    """Per playbook: its effective mode, its own mode, and what its steps could do."""
    rows = []
    for pb in sorted(playbooks, key=lambda p: p.name):
        effects = list(dict.fromkeys(EFFECTS.get(step.action, step.action) for step in pb.steps))
        rows.append({"playbook": pb.name, "mode": effective_mode(pb, force_mode), "own_mode": pb.mode,
                     "effects": effects})
    return rows


def start_summary(settings: Settings, playbooks: Iterable[Playbook], *, state_dir: Path,
                  history_s: float = 0.0, override: str = "", now: float | None = None) -> dict[str, Any]:
    """The fields of the start summary record. ``history_s``: model history already on disk;
    ``override``: what forced the playbooks' mode (``--dry-run``, a config key), if anything."""
    pbs = settings.playbooks
    rows = playbook_rows(playbooks, pbs.force_mode)
    acting = [r["playbook"] for r in rows if r["mode"] == "enforce" and r["effects"] != ["notify only"]]
    wall = time.time() if now is None else now
    if settings.model.enabled:
        remaining = max(0.0, settings.model.cold_start_s - history_s)
        end = datetime.fromtimestamp(wall + remaining, UTC).isoformat(timespec="seconds")
        cold = f"rules only until {end} ({remaining:.0f} s)" if remaining else "over (model history exists)"
    else:
        cold = "model disabled: rules only"
    summary: dict[str, Any] = {
        "playbooks_mode": pbs.force_mode or "per playbook",
        "mode_override": override or None,
        "playbooks": rows,
        "acting": acting,
        "clean_roots": list(pbs.clean_roots),
        "protected_processes": list(pbs.protected_processes),
        "cold_start": cold,
        "mqtt": (f"on: {settings.mqtt.host}:{settings.mqtt.port}" if settings.mqtt.enabled
                 else "off: nothing is reported, no commands are received"),
        "prometheus": f"on: {settings.prometheus.listen}" if settings.prometheus.enabled else "off",
        "state_dir": str(state_dir),
    }
    if pbs.force_mode == "dry-run":
        summary["to_enforce"] = ENFORCE_HINT
    return summary
