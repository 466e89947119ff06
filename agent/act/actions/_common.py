"""Helpers shared by several action families: running a system tool, writing a kernel file."""

from __future__ import annotations

import os
from pathlib import Path

from agent.act.base import ActionContext, ActionResult
from agent.act.procs import run_argv


def would_run(argv: list[str]) -> str:
    """The dry-run detail of a command: exactly the argv that would be executed."""
    return "would run: " + " ".join(argv)


async def run_tool(ctx: ActionContext, argv: list[str], timeout_s: float | None = None) -> ActionResult:
    """Run a system tool (systemctl, journalctl, ...) with the allowlisted environment, or say
    what would run in a dry run. A zero exit is success and counts as a change."""
    if ctx.dry_run:
        return ActionResult(ok=True, detail=would_run(argv), data={"argv": argv})
    done = await run_argv(argv, env=ctx.env(), timeout_s=timeout_s)
    return ActionResult(
        ok=done.ok,
        changed=done.ok,
        detail=done.describe(),
        data={"argv": argv, "returncode": done.returncode},
    )


def write_kernel_file(path: Path, value: str) -> str:
    """Write ``value`` to a cgroupfs/procfs file, never through a symlink; returns the old value."""
    old = path.read_text().strip() if path.exists() else ""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return old
