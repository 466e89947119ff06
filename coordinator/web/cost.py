"""The fleet cost API (``GET /api/cost``): fleet waste per day and per week, top wasters, trend;
and the demand API (``GET /api/demand``): forecast against actual per site and for the fleet
(:mod:`coordinator.store.demand`).

The pages (``#/cost``, ``static/cost.js``; ``#/demand``, ``static/demand.js``) and ``heald fleet
cost`` / ``heald fleet demand`` read the same JSON.
"""

from __future__ import annotations

from aiohttp import web

from coordinator.errors import BadRequest
from coordinator.replica import Coordinator
from coordinator.store.rows import dumps

COST_COORD: web.AppKey[Coordinator] = web.AppKey("cost_coord", Coordinator)


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}")
    return value


async def fleet_cost(request: web.Request) -> web.Response:
    coord = request.app[COST_COORD]
    data = await coord.store.fleet_cost(days=_int(request, "days", 14, 1, 366),
                                        top=_int(request, "top", 10, 0, 1000))
    return web.Response(body=dumps(data).encode(), content_type="application/json")


async def fleet_demand(request: web.Request) -> web.Response:
    coord = request.app[COST_COORD]
    data = await coord.store.fleet_demand(hours=_int(request, "hours", 48, 1, 24 * 60),
                                          bucket_s=_int(request, "bucket_s", 3600, 1, 86400))
    return web.Response(body=dumps(data).encode(), content_type="application/json")


def add_routes(app: web.Application, coord: Coordinator) -> None:
    app[COST_COORD] = coord
    app.router.add_get("/api/cost", fleet_cost)
    app.router.add_get("/api/demand", fleet_demand)
