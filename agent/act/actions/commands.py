"""Commands an operator configured: ``run_command`` (a playbook's argv, no shell) and ``cordon``
(``[playbooks] cordon_argv``, e.g. ``kubectl cordon {node}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.act.actions._common import run_tool, would_run
from agent.act.base import ActionContext, ActionResult
from agent.act.procs import run_argv, substitute_argv


async def run_command(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    argv = [str(a) for a in params["argv"]]
    if ctx.dry_run:
        return ActionResult(ok=True, detail=would_run(argv), data={"argv": argv})
    done = await run_argv(argv, env=ctx.env(params.get("env")), cwd=params.get("cwd"))
    return ActionResult(
        ok=done.ok, changed=True, detail=done.describe(), data={"argv": argv, "returncode": done.returncode}
    )


async def cordon(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    if not ctx.settings.cordon_argv:
        return ActionResult(ok=False, detail="playbooks.cordon_argv is not configured")
    argv = substitute_argv(ctx.settings.cordon_argv, {"node": ctx.node, **ctx.bindings})
    return await run_tool(ctx, argv, timeout_s=None)


