"""``webhook``: POST the run (playbook, target, what fired it) as JSON to a URL the playbook names.

For pre-scale and reclaim hooks (an autoscaler, a scheduler). The URL is only ever an HTTP
request's address, never run; no proxy from the environment, redirects are refused (a POST is
not silently turned into a GET elsewhere). Each attempt has a timeout; a connection error or a
5xx is retried at most ``retries`` times (1 s apart, doubling); a 4xx is final.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from agent.act.base import ActionContext, ActionResult
from agent.decide.units import parse_duration

MAX_RESPONSE = 4096  # bytes of the response kept in the result
USER_AGENT = "heald-webhook/1"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError: final, not followed


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def body(params: Mapping[str, Any], ctx: ActionContext) -> dict[str, Any]:
    return {
        "node": ctx.node,
        "playbook": ctx.playbook,
        "run_id": ctx.run_id,
        "target": dict(ctx.bindings),
        "inputs": dict(ctx.inputs),
        "sent": time.time(),
    }


def _post(url: str, data: bytes, headers: Mapping[str, str], timeout_s: float) -> tuple[int, str]:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    req = urllib.request.Request(url, data=data, method="POST", headers={  # noqa: S310 - http(s) only
        **headers, "Content-Type": "application/json", "User-Agent": USER_AGENT})
    try:
        with _OPENER.open(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read(MAX_RESPONSE).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(MAX_RESPONSE).decode("utf-8", "replace") if exc.fp else ""


async def webhook(params: Mapping[str, Any], ctx: ActionContext) -> ActionResult:
    url = str(params["url"])
    timeout_s = parse_duration(params.get("timeout", 5.0))
    retries = int(params.get("retries", 2))
    payload = body(params, ctx)
    if ctx.dry_run:
        return ActionResult(ok=True, detail=f"would POST to {url}", data={"url": url, "body": payload})
    data = json.dumps(payload, default=str).encode()
    headers = {str(k): str(v) for k, v in dict(params.get("headers", {})).items()}
    delay, tried, last = 1.0, 0, ""
    for attempt in range(retries + 1):
        tried = attempt + 1
        try:
            status, text = await asyncio.to_thread(_post, url, data, headers, timeout_s)
        except (OSError, ValueError) as exc:  # refused, unreachable, timed out, bad URL
            last = f"{type(exc).__name__}: {exc}"
            ctx.log.warning("webhook.failed", url=url, attempt=tried, error=last)
        else:
            if 200 <= status < 300:
                return ActionResult(ok=True, changed=True, detail=f"POST {url}: {status}",
                                    data={"url": url, "status": status, "attempts": tried,
                                          "response": text[:MAX_RESPONSE]})
            last = f"HTTP {status}"
            ctx.log.warning("webhook.failed", url=url, attempt=tried, status=status)
            if status < 500:
                break
        if attempt < retries:
            await asyncio.sleep(delay)
            delay *= 2
    return ActionResult(ok=False, detail=f"POST {url} failed after {tried} attempt(s): {last}",
                        data={"url": url, "attempts": tried, "error": last})
