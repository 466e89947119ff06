"""The bundle registry's JSON API (``heald fleet bundle``): list, publish, shadow, promote, roll back.

``add_routes`` also runs the canary watch (:meth:`coordinator.bundles.Rollout.watch`) for as long
as the web application runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from coordinator.bundles import Rollout
from coordinator.errors import BadRequest
from coordinator.replica import Coordinator

ROLLOUT: web.AppKey[Rollout] = web.AppKey("rollout", Rollout)


def _ok(data: Any) -> web.Response:
    return web.json_response(data, dumps=json.dumps)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _num(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f'"{key}" must be a number')
    return float(value)


async def listing(request: web.Request) -> web.Response:
    return _ok(request.app[ROLLOUT].listing())


async def publish(request: web.Request) -> web.Response:
    body = await _body(request)
    version, files, reason = body.get("version"), body.get("files"), body.get("reason", "")
    if not isinstance(version, str) or not isinstance(reason, str) or not isinstance(files, dict) \
            or not all(isinstance(v, str) for v in files.values()):
        raise BadRequest('body needs "version": <text>, "files": {name: yaml text}, "reason": <text>')
    return _ok(await request.app[ROLLOUT].publish(version, files, request["actor"], reason))


async def shadow(request: web.Request) -> web.Response:
    return _ok(await request.app[ROLLOUT].shadow(request.match_info["version"], request["actor"]))


async def unshadow(request: web.Request) -> web.Response:
    return _ok(await request.app[ROLLOUT].shadow("", request["actor"]))


async def promote(request: web.Request) -> web.Response:
    body = await _body(request)
    nodes = body.get("nodes") or None
    if nodes is not None and not (isinstance(nodes, list) and all(isinstance(n, str) for n in nodes)):
        raise BadRequest('"nodes" must be a list of node names')
    state = await request.app[ROLLOUT].promote(
        request.match_info["version"], request["actor"], nodes=nodes, share=_num(body, "share", 1.0),
        window_s=_num(body, "window_s", 3600.0), margin_per_h=_num(body, "margin_per_h", 10.0))
    return _ok(state)


async def rollback(request: web.Request) -> web.Response:
    body = await _body(request)
    return _ok(await request.app[ROLLOUT].rollback(request["actor"], str(body.get("reason") or "operator")))


async def judge(request: web.Request) -> web.Response:
    return _ok({"canary": await request.app[ROLLOUT].judge()})


def add_routes(app: web.Application, coord: Coordinator) -> None:
    rollout = Rollout(coord)
    app[ROLLOUT] = rollout

    async def watch(_app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(rollout.watch(), name="canary-watch")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(watch)
    r = app.router
    r.add_get("/api/bundles", listing)
    r.add_post("/api/bundles", publish)
    r.add_post("/api/bundles/rollback", rollback)
    r.add_get("/api/bundles/canary", judge)
    r.add_post("/api/bundles/{version}/shadow", shadow)
    r.add_post("/api/bundles/shadow/off", unshadow)
    r.add_post("/api/bundles/{version}/promote", promote)
