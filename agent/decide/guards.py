"""Guards, per target: cooldown with exponential backoff, runs per window, circuit breaker.

Every guard is kept per target (:mod:`agent.decide.targets`): the playbook and the labels its
trigger bound, so one mount, unit or GPU that cannot be healed never holds the playbook for the
others. The playbook-wide and node-wide limits are separate, explicit knobs:
``guards.max_parallel`` (runs of one playbook at once, over all its targets) and
``[playbooks] max_concurrent`` (runs on the node at once).

The counters live in :class:`TargetState`, persisted by :class:`StateStore` as one JSON file
written atomically (temp file, fsync, rename, fsync of the directory), so they survive SIGHUP
reloads (kept by key) and restarts. Times are wall-clock seconds: monotonic clocks restart with
the host. When the state directory is full or read-only the counters live on in memory and are
written again at the next change once there is room: guards keep working either way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import structlog

from agent.decide.model import Playbook
from agent.fsutil import atomic_write

log = structlog.get_logger("heald.decide")


class TargetState(msgspec.Struct, kw_only=True):
    playbook: str = ""
    bindings: dict[str, str] = msgspec.field(default_factory=dict)
    last_start: float | None = None
    last_end: float | None = None
    last_outcome: str = ""
    consecutive_failures: int = 0
    runs: list[float] = msgspec.field(default_factory=list)  # start times inside the longest window
    breaker_open_since: float | None = None
    events_watermark: float = 0.0
    total_runs: int = 0
    total_failures: int = 0


class _StateFileV1(msgspec.Struct, kw_only=True):
    """Format 1 (before per-target guards): one state per playbook."""

    version: int = 1
    playbooks: dict[str, TargetState] = msgspec.field(default_factory=dict)


class StateFile(msgspec.Struct, kw_only=True):
    version: int = 2
    targets: dict[str, TargetState] = msgspec.field(default_factory=dict)  # by Target.key


class StateStore:
    """Per-target guard counters in ``<state_dir>/playbooks.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "playbooks.json"
        self.data = StateFile()
        self._unsaved = False
        if self.path.exists():
            self.data = self._read()

    def _read(self) -> StateFile:
        try:
            raw = self.path.read_bytes()
            version = msgspec.json.decode(raw, type=dict[str, object]).get("version", 1)
            if version == 1:
                # A playbook's old counters become those of its unbound target; bound targets
                # start fresh (format 1 could not tell which target had failed).
                old = msgspec.json.decode(raw, type=_StateFileV1)
                return StateFile(targets={name: msgspec.structs.replace(state, playbook=name)
                                          for name, state in old.playbooks.items()})
            return msgspec.json.decode(raw, type=StateFile)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Keep the bad file for a human; start from empty counters rather than not at all.
            log.error("playbook state unreadable; starting from empty counters", path=str(self.path),
                      error=str(exc))
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_suffix(".json.corrupt"))
            return StateFile()

    def get(self, key: str, playbook: str = "", bindings: dict[str, str] | None = None) -> TargetState:
        state = self.data.targets.get(key)
        if state is None:
            state = self.data.targets[key] = TargetState(playbook=playbook or key,
                                                         bindings=dict(bindings or {}))
        return state

    def of_playbook(self, playbook: str) -> dict[str, TargetState]:
        """Every target of one playbook that has state."""
        return {k: s for k, s in self.data.targets.items() if s.playbook == playbook}

    def save(self) -> None:
        """Persist; on a full or read-only state dir keep the counters in memory (logged once)."""
        try:
            atomic_write(self.path, msgspec.json.format(msgspec.json.encode(self.data), indent=1))
        except OSError as exc:
            if not self._unsaved:
                log.error("playbook state not saved (state dir full or read-only); guards go on from "
                          "memory", path=str(self.path), error=str(exc))
            self._unsaved = True
            return
        if self._unsaved:
            log.info("playbook state saved again", path=str(self.path))
        self._unsaved = False


def cooldown_s(pb: Playbook, state: TargetState) -> float:
    """The cooldown after the last run: base * backoff^(consecutive failures), capped."""
    g = pb.guards
    return min(g.cooldown_s * (g.backoff**state.consecutive_failures), max(g.max_cooldown_s, g.cooldown_s))


def hold_reason(pb: Playbook, state: TargetState, now: float) -> str | None:
    """Why a triggered target may not start a run now (None: it may). Also expires old entries."""
    g = pb.guards
    if state.breaker_open_since is not None:
        if g.breaker_reset_s is not None and now - state.breaker_open_since >= g.breaker_reset_s:
            state.breaker_open_since = None
            state.consecutive_failures = 0
        else:
            return "breaker-open"
    if state.last_end is not None:
        remaining = state.last_end + cooldown_s(pb, state) - now
        if remaining > 0:
            return "cooldown"
    state.runs = [t for t in state.runs if now - t < g.window_s]
    if len(state.runs) >= g.max_runs:
        return "max-runs"
    return None


def record_start(state: TargetState, now: float) -> None:
    state.last_start = now
    state.runs.append(now)
    state.total_runs += 1


def record_end(pb: Playbook, state: TargetState, now: float, outcome: str, *, counts: bool = True) -> bool:
    """Record a finished run; returns True when this failure just opened the breaker."""
    state.last_end = now
    state.last_outcome = outcome
    state.events_watermark = max(state.events_watermark, now)
    if not counts:
        return False
    if outcome == "succeeded":
        state.consecutive_failures = 0
        return False
    state.consecutive_failures += 1
    state.total_failures += 1
    if state.breaker_open_since is None and state.consecutive_failures >= pb.guards.breaker_failures:
        state.breaker_open_since = now
        return True
    return False
