"""systemd actions: ``restart_unit`` (``systemctl restart UNIT``, argv from ``[playbooks] systemctl``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.act.actions._common import run_tool
from agent.act.base import ActionContext, ActionResult


async def restart_unit(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    return await run_tool(ctx, [*ctx.settings.systemctl, "restart", str(params["unit"])])
