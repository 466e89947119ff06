"""Guards: cooldown with exponential backoff, max runs per window, circuit breaker.

The counters live in :class:`PlaybookState`, persisted by :class:`StateStore` as one JSON file
written atomically (temp file, fsync, rename, fsync of the directory), so they survive SIGHUP
reloads (kept by playbook name) and restarts. Times are wall-clock seconds: monotonic clocks
restart with the host.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import structlog

from agent.decide.model import Playbook
from agent.fsutil import atomic_write

log = structlog.get_logger("heald.decide")


class PlaybookState(msgspec.Struct, kw_only=True):
    last_start: float | None = None
    last_end: float | None = None
    last_outcome: str = ""
    consecutive_failures: int = 0
    runs: list[float] = msgspec.field(default_factory=list)  # start times inside the longest window
    breaker_open_since: float | None = None
    events_watermark: float = 0.0
    total_runs: int = 0
    total_failures: int = 0


class StateFile(msgspec.Struct, kw_only=True):
    version: int = 1
    playbooks: dict[str, PlaybookState] = msgspec.field(default_factory=dict)


class StateStore:
    """Per-playbook guard counters in ``<state_dir>/playbooks.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "playbooks.json"
        self.data = StateFile()
        if self.path.exists():
            try:
                self.data = msgspec.json.decode(self.path.read_bytes(), type=StateFile)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                # Keep the bad file for a human; start from empty counters rather than not at all.
                log.error(
                    "playbook state unreadable; starting from empty counters",
                    path=str(self.path),
                    error=str(exc),
                )
                with contextlib.suppress(OSError):
                    self.path.replace(self.path.with_suffix(".json.corrupt"))

    def get(self, name: str) -> PlaybookState:
        return self.data.playbooks.setdefault(name, PlaybookState())

    def save(self) -> None:
        atomic_write(self.path, msgspec.json.format(msgspec.json.encode(self.data), indent=1))


def cooldown_s(pb: Playbook, st: PlaybookState) -> float:
    """The cooldown after the last run: base * backoff^(consecutive failures), capped."""
    g = pb.guards
    return min(g.cooldown_s * (g.backoff**st.consecutive_failures), max(g.max_cooldown_s, g.cooldown_s))


def hold_reason(pb: Playbook, st: PlaybookState, now: float) -> str | None:
    """Why a triggered playbook may not start a run now (None: it may). Also expires old entries."""
    g = pb.guards
    if st.breaker_open_since is not None:
        if g.breaker_reset_s is not None and now - st.breaker_open_since >= g.breaker_reset_s:
            st.breaker_open_since = None
            st.consecutive_failures = 0
        else:
            return "breaker-open"
    if st.last_end is not None:
        remaining = st.last_end + cooldown_s(pb, st) - now
        if remaining > 0:
            return "cooldown"
    st.runs = [t for t in st.runs if now - t < g.window_s]
    if len(st.runs) >= g.max_runs:
        return "max-runs"
    return None


def record_start(st: PlaybookState, now: float) -> None:
    st.last_start = now
    st.runs.append(now)
    st.total_runs += 1


def record_end(pb: Playbook, st: PlaybookState, now: float, outcome: str, *, counts: bool = True) -> bool:
    """Record a finished run; returns True when this failure just opened the breaker."""
    st.last_end = now
    st.last_outcome = outcome
    st.events_watermark = max(st.events_watermark, now)
    if not counts:
        return False
    if outcome == "succeeded":
        st.consecutive_failures = 0
        return False
    st.consecutive_failures += 1
    st.total_failures += 1
    if st.breaker_open_since is None and st.consecutive_failures >= pb.guards.breaker_failures:
        st.breaker_open_since = now
        return True
    return False
