"""The dashboard and JSON API (aiohttp).

Authentication: every route except ``/login``, ``/static/*`` and ``/api/health`` needs either

* ``Authorization: Bearer <token>`` (a token or the password from coordinator.toml) — the CLI
  and scripts; no cookie is involved, so no CSRF check; or
* the ``heald_session`` cookie set by ``POST /login`` (HttpOnly, SameSite=Strict, Secure when
  configured). Sessions live in the store, so any replica accepts them. Unsafe methods with a
  session also need the session's CSRF token in ``X-CSRF-Token`` (or a ``csrf`` form field), and
  a cross-origin ``Origin`` header is refused.

Wrong secrets, on either path, are throttled per client address (:mod:`coordinator.web.throttle`):
after ``[web] login_max_failures`` the client is refused with 429 and ``Retry-After`` for an
exponentially growing time, whatever it sends; every lockout is logged and audited.

Security headers (:data:`SECURITY_HEADERS`) are set by the ``on_response_prepare`` signal, so
every response the app prepares carries them: pages, the API, redirects, errors (4xx and 5xx,
the router's own 404/405 included) and the event stream, which its handler prepares itself.

Live updates: ``GET /api/stream`` is a Server-Sent Events stream. It polls the store's change
cursors (so changes made by any replica show up) and wakes early when this replica commits a
batch; the page re-fetches what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

import structlog
from aiohttp import web

from coordinator.config import login_secrets, parse_listen
from coordinator.errors import BadRequest, Conflict, NotFound
from coordinator.replica import Coordinator
from coordinator.store import NodeQuery, dumps
from coordinator.store.rows import TableName
from coordinator.web.throttle import (
    IPNetwork,
    LoginThrottle,
    client_address,
    client_key,
    parse_networks,
    retry_after_header,
    throttle_from,
)

log = structlog.get_logger("coordinator.web")

COOKIE: Final = "heald_session"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COORD: web.AppKey[Coordinator] = web.AppKey("coordinator", Coordinator)
SECRETS: web.AppKey[tuple[list[str], list[str]]] = web.AppKey("secrets", tuple)
THROTTLE: web.AppKey[LoginThrottle] = web.AppKey("throttle", LoginThrottle)
PROXIES: web.AppKey[tuple[IPNetwork, ...]] = web.AppKey("trusted_proxies", tuple)
PUBLIC_PATHS: Final = frozenset({"/login", "/api/health"})
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
    return resources.files("coordinator.web").joinpath("static", name).read_bytes()


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(data).encode(), status=status, content_type="application/json")


def error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _matches(candidate: str, secrets_list: list[str]) -> bool:
    ok = False
    for s in secrets_list:  # compare with every secret: timing does not tell which one matched
        ok |= hmac.compare_digest(candidate.encode(), s.encode())
    return ok


def _wants_html(request: web.Request) -> bool:
    return not request.path.startswith("/api/")


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs for every response, however it was made or prepared."""
    response.headers.update(SECURITY_HEADERS)


def client(request: web.Request) -> str:
    """The client's address: the TCP peer, or what a trusted proxy says (``[web] trusted_proxies``)."""
    return client_address(request.remote, request.headers.getall("X-Forwarded-For", ()), request.app[PROXIES])


def too_many(request: web.Request, retry_after: float, *, html: bool) -> web.Response:
    """The lockout refusal: the same whatever the client sent (the secret is not looked at)."""
    seconds = retry_after_header(retry_after)
    headers = {"Retry-After": seconds}
    if html:
        message = f'<p class="error">Too many failed attempts: try again in {seconds} s.</p>'
        return web.Response(
            text=LOGIN_PAGE.format(message=message), content_type="text/html", status=429, headers=headers
        )
    response = error(429, f"too many wrong secrets from this address: try again in {seconds} s")
    response.headers.update(headers)
    return response


async def failed(request: web.Request, key: str, via: str) -> None:
    """Record a wrong secret from ``key`` (before the first await: right after the comparison),
    then log it, and log and audit the lockout it may start."""
    outcome = request.app[THROTTLE].failure(key)
    if outcome.lockout_s:
        log.warning(
            "login lockout", client=key, via=via, failures=outcome.failures, lockout_s=outcome.lockout_s
        )
        await request.app[COORD].store.audit(
            f"client@{key}",
            "login.lockout",
            detail={"via": via, "failures": outcome.failures, "lockout_s": outcome.lockout_s},
        )
    else:
        log.warning("login failed", client=key, via=via, failures=outcome.failures)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
        return await handler(request)
    passwords, tokens = request.app[SECRETS]
    header = request.headers.get("Authorization", "")
    if header:
        throttle, key = request.app[THROTTLE], client_key(client(request))
        # check, compare and record with no await in between (see coordinator.web.throttle)
        if wait := throttle.retry_after(key):
            return too_many(request, wait, html=False)
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token and _matches(token.strip(), tokens + passwords):
            throttle.success(key)
            request["actor"] = "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:8]
            request["csrf_ok"] = True
            return await handler(request)
        await failed(request, key, "bearer")
        await asyncio.sleep(0.2)
        return error(401, "invalid bearer token")
    session_id = request.cookies.get(COOKIE, "")
    session = await request.app[COORD].store.get_session(_hash(session_id)) if session_id else None
    if session is None:
        if _wants_html(request) and request.method == "GET":
            raise web.HTTPFound("/login")
        return error(401, "authentication required: log in or send Authorization: Bearer <token>")
    request["actor"] = session["actor"]
    request["csrf"] = session["csrf"]
    request["session_hash"] = _hash(session_id)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return error(403, "cross-origin request refused")
        sent = request.headers.get("X-CSRF-Token", "")
        if not sent and request.content_type == "application/x-www-form-urlencoded":
            sent = str((await request.post()).get("csrf", ""))
        if not sent or not hmac.compare_digest(sent.encode(), str(session["csrf"]).encode()):
            return error(403, "missing or wrong CSRF token (X-CSRF-Token)")
    return await handler(request)


@web.middleware
async def errors_to_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NotFound as exc:
        return error(404, str(exc))
    except Conflict as exc:
        return error(409, str(exc))
    except BadRequest as exc:
        return error(400, str(exc))


# ---------------------------------------------------------------------------------------- pages

LOGIN_PAGE: Final = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>heald coordinator — log in</title><link rel="stylesheet" href="/static/app.css"></head>
<body class="login"><form method="post" action="/login" class="card" id="login-form">
<h1>heald coordinator</h1>{message}
<label>Password or token <input type="password" name="secret" id="secret" autofocus required></label>
<button type="submit" id="login">Log in</button></form></body></html>"""


async def login_page(request: web.Request) -> web.Response:
    return web.Response(text=LOGIN_PAGE.format(message=""), content_type="text/html")


async def login(request: web.Request) -> web.Response:
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return error(403, "cross-origin login refused")
    form = await request.post()
    secret = str(form.get("secret", ""))
    passwords, tokens = request.app[SECRETS]
    throttle, address = request.app[THROTTLE], client(request)
    key = client_key(address)
    # check, compare and record with no await in between (see coordinator.web.throttle)
    if wait := throttle.retry_after(key):
        return too_many(request, wait, html=True)
    if not secret or not _matches(secret, passwords + tokens):
        await failed(request, key, "login")
        await asyncio.sleep(0.5)  # slow down guessing
        return web.Response(
            text=LOGIN_PAGE.format(message='<p class="error">Wrong password or token.</p>'),
            content_type="text/html",
            status=401,
        )
    throttle.success(key)
    coord = request.app[COORD]
    session_id = secrets.token_urlsafe(32)
    actor = "operator@" + address
    await coord.store.create_session(
        _hash(session_id), secrets.token_urlsafe(24), actor, coord.settings.web.session_ttl_s
    )
    await coord.store.audit(actor, "login")
    response = web.HTTPFound("/")
    response.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=coord.settings.web.secure_cookie,
        max_age=int(coord.settings.web.session_ttl_s),
    )
    raise response


async def logout(request: web.Request) -> web.Response:
    if "session_hash" in request:
        await request.app[COORD].store.delete_session(request["session_hash"])
    response = web.HTTPFound("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def index(request: web.Request) -> web.Response:
    return web.Response(body=_static("index.html"), content_type="text/html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    types = {"app.js": "application/javascript", "cost.js": "application/javascript",
             "demand.js": "application/javascript", "app.css": "text/css"}
    if name not in types:
        raise web.HTTPNotFound()
    return web.Response(body=_static(name), content_type=types[name])


# ---------------------------------------------------------------------------------------- API


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be an integer") from None
    return max(lo, min(hi, value))


def _float(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be a number") from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def health(request: web.Request) -> web.Response:
    coord = request.app[COORD]
    return json_response({"ok": True, "replica": coord.replica, "mqtt_connected": coord.bus.stats.connected})


async def session_info(request: web.Request) -> web.Response:
    return json_response({"actor": request["actor"], "csrf": request.get("csrf")})


async def info(request: web.Request) -> web.Response:
    coord = request.app[COORD]
    return json_response(
        coord.info() | {"counts": await coord.store.counts(), "login": request.app[THROTTLE].info()}
    )


async def nodes(request: web.Request) -> web.Response:
    coord = request.app[COORD]
    label = request.query.get("label", "")
    label_pair: tuple[str, str] | None = None
    if label:
        k, sep, v = label.partition("=")
        if not sep or not k:
            raise BadRequest("label filter must be key=value")
        label_pair = (k, v)
    sort = request.query.get("sort", "risk")
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be asc or desc")
    state = request.query.get("state", "")
    if state not in ("", "online", "offline", "alert", "silenced"):
        raise BadRequest("state must be online, offline, alert or silenced")
    q = NodeQuery(
        site=request.query.get("site", ""),
        label=label_pair,
        q=request.query.get("q", ""),
        state=state,
        sort=sort,
        descending=order == "desc",
        offset=_int(request, "offset", 0, 0, 10**9),
        limit=_int(request, "limit", 50, 1, coord.settings.web.page_max),
    )
    return json_response(await coord.store.list_nodes(q))


async def node(request: web.Request) -> web.Response:
    return json_response(await request.app[COORD].store.get_node(request.match_info["node"]))


async def node_metrics(request: web.Request) -> web.Response:
    since = _float(request, "since", time.time() - 900)
    limit = _int(request, "limit", 900, 1, 20_000)
    return json_response(
        await request.app[COORD].store.node_metrics(request.match_info["node"], since, limit)
    )


async def node_risk(request: web.Request) -> web.Response:
    since = _float(request, "since", time.time() - 3600)
    limit = _int(request, "limit", 2000, 1, 20_000)
    return json_response(await request.app[COORD].store.node_risk(request.match_info["node"], since, limit))


def _table(
    name: TableName, where_from: Callable[[web.Request], tuple[str, list[Any]]], order: str = "id DESC"
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        where, params = where_from(request)
        rows = await request.app[COORD].store.table(
            name,
            where=where,
            params=params,
            order=order,
            limit=_int(request, "limit", 100, 1, 1000),
            offset=_int(request, "offset", 0, 0, 10**9),
        )
        return json_response({"items": rows})

    return handler


def _by_node(request: web.Request) -> tuple[str, list[Any]]:
    return "node = ?", [request.match_info["node"]]


def _by_state(default: str) -> Callable[[web.Request], tuple[str, list[Any]]]:
    def where(request: web.Request) -> tuple[str, list[Any]]:
        state = request.query.get("state", default)
        if state == "all":
            return "", []
        return "state = ?", [state]

    return where


def _active_leases(request: web.Request) -> tuple[str, list[Any]]:
    if request.query.get("all"):
        return "", []
    return "released_at IS NULL AND expires_at > ?", [time.time()]


async def approve(request: web.Request) -> web.Response:
    cmd = await request.app[COORD].decide_approval(request.match_info["id"], True, request["actor"])
    return json_response({"ok": True, "command_id": cmd.id, "node": cmd.node})


async def deny(request: web.Request) -> web.Response:
    cmd = await request.app[COORD].decide_approval(request.match_info["id"], False, request["actor"])
    return json_response({"ok": True, "command_id": cmd.id, "node": cmd.node})


async def run_playbook(request: web.Request) -> web.Response:
    body = await _json_body(request)
    playbook = body.get("playbook")
    if not isinstance(playbook, str):
        raise BadRequest('body needs "playbook": <name>')
    args = body.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(v, str | int | float | bool) for v in args.values()):
        raise BadRequest('"args" must be an object of scalars')
    cmd = await request.app[COORD].run_playbook(request.match_info["node"], playbook, request["actor"], args)
    return json_response({"ok": True, "command_id": cmd.id, "node": cmd.node})


async def silence(request: web.Request) -> web.Response:
    body = await _json_body(request)
    duration = body.get("duration_s")
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise BadRequest('body needs "duration_s": <seconds>')
    cmd = await request.app[COORD].silence(request.match_info["node"], float(duration), request["actor"])
    return json_response({"ok": True, "command_id": cmd.id, "node": cmd.node, "until": cmd.args["until"]})


async def unsilence(request: web.Request) -> web.Response:
    cmd = await request.app[COORD].unsilence(request.match_info["node"], request["actor"])
    return json_response({"ok": True, "command_id": cmd.id, "node": cmd.node})


async def set_site(request: web.Request) -> web.Response:
    body = await _json_body(request)
    site = body.get("site")
    if not isinstance(site, str):
        raise BadRequest('body needs "site": <site id>')
    node = request.match_info["node"]
    was = await request.app[COORD].set_site(node, site, request["actor"])
    return json_response({"ok": True, "node": node, "site": site, "was": was})


async def resolve(request: web.Request) -> web.Response:
    try:
        esc_id = int(request.match_info["id"])
    except ValueError:
        raise BadRequest("escalation id must be an integer") from None
    await request.app[COORD].resolve_escalation(esc_id, request["actor"])
    return json_response({"ok": True})


async def stream(request: web.Request) -> web.StreamResponse:
    coord = request.app[COORD]
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    last = await coord.store.cursor()
    last_nodes = float(last.get("nodes") or 0)
    await response.write(b"event: hello\ndata: " + dumps({"cursor": last}).encode() + b"\n\n")
    poll = coord.settings.web.stream_poll_s
    next_ping = time.monotonic() + 15
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    await coord.bus.changed.wait()
            coord.bus.changed.clear()
            await asyncio.sleep(0.05)  # let a burst of batches coalesce into one event
            now_cursor = await coord.store.cursor()
            what = sorted(k for k, v in now_cursor.items() if v != last.get(k))
            if what:
                changed_nodes = await coord.store.changed_nodes(last_nodes) if "nodes" in what else []
                last, last_nodes = now_cursor, float(now_cursor.get("nodes") or 0)
                await response.write(
                    b"event: change\ndata: "
                    + dumps({"what": what, "nodes": changed_nodes, "cursor": now_cursor}).encode()
                    + b"\n\n"
                )
            elif time.monotonic() > next_ping:
                await response.write(b": ping\n\n")
                next_ping = time.monotonic() + 15
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # client went away, or shutdown
    return response


def build_app(coord: Coordinator) -> web.Application:
    app = web.Application(middlewares=[errors_to_json, auth], client_max_size=64 * 1024)
    app.on_response_prepare.append(security_headers)
    app[COORD] = coord
    app[SECRETS] = login_secrets(coord.settings)
    app[THROTTLE] = throttle_from(coord.settings.web)
    app[PROXIES] = parse_networks(coord.settings.web.trusted_proxies)
    r = app.router
    r.add_get("/login", login_page)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/", index)
    r.add_get("/static/{name}", static)
    r.add_get("/api/health", health)
    r.add_get("/api/session", session_info)
    r.add_get("/api/info", info)
    r.add_get("/api/nodes", nodes)
    r.add_get("/api/nodes/{node}", node)
    r.add_get("/api/nodes/{node}/metrics", node_metrics)
    r.add_get("/api/nodes/{node}/risk", node_risk)
    r.add_get("/api/nodes/{node}/actions", _table("actions", _by_node))
    r.add_get("/api/nodes/{node}/events", _table("events", _by_node))
    r.add_get("/api/nodes/{node}/audit", _table("audit", _by_node))
    r.add_get("/api/nodes/{node}/commands", _table("commands", _by_node, "issued_at DESC"))
    r.add_post("/api/nodes/{node}/run", run_playbook)
    r.add_post("/api/nodes/{node}/silence", silence)
    r.add_post("/api/nodes/{node}/unsilence", unsilence)
    r.add_post("/api/nodes/{node}/site", set_site)
    r.add_get("/api/approvals", _table("approvals", _by_state("pending"), "requested_at DESC"))
    r.add_post("/api/approvals/{id}/approve", approve)
    r.add_post("/api/approvals/{id}/deny", deny)
    r.add_get("/api/escalations", _table("escalations", _by_state("open")))
    r.add_post("/api/escalations/{id}/resolve", resolve)
    r.add_get("/api/leases", _table("leases", _active_leases, "granted_at DESC"))
    r.add_get("/api/audit", _table("audit", lambda _r: ("", [])))
    r.add_get("/api/stream", stream)
    from coordinator.web import bundles  # noqa: PLC0415 - the registry's routes and the canary watch

    bundles.add_routes(app, coord)
    from coordinator.web import cost  # noqa: PLC0415 - the cost page's API

    cost.add_routes(app, coord)
    return app


async def run_web(coord: Coordinator) -> None:
    host, port = parse_listen(coord.settings.web.listen)
    runner = web.AppRunner(build_app(coord), access_log=None, handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("dashboard listening", url=f"http://{host}:{port}/")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
