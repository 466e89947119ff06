"""A real daemon (build_daemon, real signals) with one clean-up that misbehaves on stop, for
tests/test_stop_deadline.py: ``python stop_deadline_child.py CONFIG DEADLINE_S stubborn|stuck-thread``."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from agent.cli.base import configure_logging
from agent.runtime.config import load_config
from agent.runtime.daemon import build_daemon


async def stubborn() -> None:
    """Swallows every cancellation: the TaskGroup waits for it forever."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue


async def stuck_thread() -> None:
    """On stop, leaves a default-executor thread blocked: the daemon's run() ends, and the
    interpreter's join of that thread at exit does not."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        asyncio.get_running_loop().run_in_executor(None, time.sleep, 3600)
        raise


def main() -> int:
    cfg, deadline_s, kind = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    loaded = load_config(cfg)
    configure_logging("info", "json")
    daemon = build_daemon(loaded, cfg)
    daemon.add_task(kind, stubborn if kind == "stubborn" else stuck_thread)
    daemon.stop_deadline_s = deadline_s
    daemon.deadline_past_run = True  # as `heald run` does
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    sys.exit(main())
