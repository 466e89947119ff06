"""The state directory: spool, journal, audit log, models, counters."""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from agent.errors import HealdError

log = structlog.get_logger("heald.paths")


def _usable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def resolve_state_dir(configured: str, env: dict[str, str] | None = None) -> Path:
    """The configured state dir, or — for an unprivileged run outside systemd — the user's one.

    Under systemd (``$STATE_DIRECTORY`` or ``$INVOCATION_ID`` set) there is no fallback: a state
    directory we cannot write is an error, so that a node never silently loses its journal.
    """
    env = dict(os.environ) if env is None else env
    if env.get("STATE_DIRECTORY"):
        configured = env["STATE_DIRECTORY"].split(":")[0]
    path = Path(configured)
    if _usable(path):
        return path
    if env.get("STATE_DIRECTORY") or env.get("INVOCATION_ID"):
        raise HealdError(f"state directory {path} is not writable")
    base = Path(env.get("XDG_STATE_HOME") or Path(env.get("HOME", "/tmp")) / ".local" / "state")  # noqa: S108
    fallback = base / "heald"
    if not _usable(fallback):
        raise HealdError(f"neither {path} nor {fallback} is writable")
    log.warning("state directory not writable, using the user's one", configured=str(path),
                using=str(fallback))
    return fallback
