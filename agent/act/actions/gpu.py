"""GPU actions: ``gpu_reset`` and ``gpu_drain`` (and its undo), through the configured argv
templates (``nvidia-smi ...``) or, under heald.service, the root-only ``heald-action@`` helper."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent.act.actions._common import run_tool
from agent.act.base import ActionContext, ActionResult
from agent.act.procs import substitute_argv
from agent.errors import HealdError


def _gpu_values(params: Mapping[str, Any], ctx: ActionContext) -> dict[str, str]:
    """``{gpu}``/``{pci}``/``{uuid}`` for the GPU argv templates: explicit params win, then the
    run's bindings (an XID event binds ``gpu``), then the GPU collector's device table."""
    vals = {"node": ctx.node, **ctx.bindings}
    for k in ("gpu", "pci"):
        if k in params:
            vals[k] = str(params[k])
    gpu_detail = ctx.detail.get("gpu")
    devices = gpu_detail.get("devices") if isinstance(gpu_detail, Mapping) else None
    dev = devices.get(vals["gpu"]) if isinstance(devices, Mapping) and "gpu" in vals else None
    if isinstance(dev, Mapping):
        for k in ("pci", "uuid"):
            if k not in vals and dev.get(k):
                vals[k] = str(dev[k])
    return vals


_GPU_INDEX_RE = re.compile(r"0|[1-9][0-9]?")  # as heald-action accepts it (0..63)


async def _gpu_helper(ctx: ActionContext, what: str, vals: Mapping[str, str]) -> ActionResult:
    """``systemctl start heald-action@<what>-<gpu>.service``: the root-only helper does the step."""
    gpu = vals.get("gpu")
    if gpu is None:
        return ActionResult(ok=False, detail=f"{what} needs a gpu index (params.gpu or a bound {{gpu}})")
    if not _GPU_INDEX_RE.fullmatch(gpu) or int(gpu) > 63:
        return ActionResult(ok=False, detail=f"{what}: gpu {gpu!r} is not a GPU index (0..63)")
    return await run_tool(ctx, [*ctx.settings.systemctl, "start", f"heald-action@{what}-{gpu}.service"])


async def gpu_reset(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    vals = _gpu_values(params, ctx)
    if ctx.settings.use_helper_units:
        return await _gpu_helper(ctx, "gpu-reset", vals)
    try:
        argv = substitute_argv(ctx.settings.gpu_reset_argv, vals)
    except HealdError as exc:
        return ActionResult(ok=False, detail=str(exc))
    return await run_tool(ctx, argv)


async def gpu_drain(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    vals = _gpu_values(params, ctx)
    if ctx.settings.use_helper_units:
        # nvidia-smi drain needs CAP_SYS_ADMIN, which heald.service does not hold
        return await _gpu_helper(ctx, "gpu-undrain" if params.get("undo") else "gpu-drain", vals)
    template = ctx.settings.gpu_undrain_argv if params.get("undo") else ctx.settings.gpu_drain_argv
    try:
        argv = substitute_argv(template, vals)
    except HealdError as exc:
        return ActionResult(ok=False, detail=str(exc))
    return await run_tool(ctx, argv)

