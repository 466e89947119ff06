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


def _read_only_fs(path: Path) -> bool:
    try:
        return path.is_dir() and bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def resolve_state_dir(configured: str, env: dict[str, str] | None = None) -> Path:
    """The configured state dir, or — for an unprivileged run outside systemd — the user's one.

    Under systemd (``$STATE_DIRECTORY`` or ``$INVOCATION_ID`` set) there is no fallback: a state
    directory we cannot write is an error, so that a node never silently loses its journal.

    A state directory on a filesystem that has gone read-only (issue 17: errors=remount-ro after
    a disk fault) is used all the same: the daemon must go on healing, and every stage runs
    degraded there (reads what it can, keeps the rest in memory, logs once per failure streak).
    Switching to another directory would hide the journal of the runs in progress instead.
    """
    env = dict(os.environ) if env is None else env
    if env.get("STATE_DIRECTORY"):
        configured = env["STATE_DIRECTORY"].split(":")[0]
    path = Path(configured)
    if _usable(path):
        return path
    if _read_only_fs(path):
        log.error("state directory is on a read-only filesystem: running degraded, nothing is persisted "
                  "until it is writable again", path=str(path))
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
