"""``notify``: publish an event for humans (the daemon's ``on_event`` sends it on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.act.base import ActionContext, ActionResult


async def notify(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    event = {
        "kind": params.get("kind", "playbook.notify"),
        "severity": params.get("severity", "warning"),
        "message": str(params["message"]),
        "playbook": ctx.playbook,
        "run_id": ctx.run_id,
        "labels": dict(ctx.bindings),
        "dry_run": ctx.dry_run,
    }
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would publish {event['kind']}: {event['message']}")
    ctx.emit(event)
    return ActionResult(ok=True, changed=False, detail=f"published {event['kind']}")


