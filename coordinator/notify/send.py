"""What a notice looks like on each kind of route, and sending it (aiohttp).

- ``webhook``: heald's JSON, ``{"version": 1, "coordinator": ..., **notice}`` (see
  :meth:`coordinator.notify.outbox.Notice.as_dict`), with an ``Idempotency-Key`` header
  (``<key>:<status>``, the same on every retry) so a receiver can drop a repeat;
- ``slack``: ``{"text": ...}``, what Slack-compatible incoming webhooks take;
- ``alertmanager``: a list of one alert POSTed to ``<url>/api/v2/alerts``. Its labels identify
  it (``alertname``, ``heald_key``, ``node``, ``site``, ``severity``, ``kind``), so Alertmanager
  deduplicates resends; a firing alert ends ``4 * alertmanager_refresh_s`` ahead and is sent
  again meanwhile, a resolved one ends now.

A send succeeds on a 2xx answer; a 4xx other than 408 and 429 will not get better and is given up
at once; anything else (no connection, a timeout, a 5xx) is retried.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from coordinator.config import NotifyRoute

ALERT_NAMES: Final = {
    "escalation": "HealdEscalation",
    "approval": "HealdApprovalAwaited",
    "offline": "HealdNodeOffline",
}
#: 4xx answers that may succeed later.
RETRYABLE_4XX: Final = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class SendResult:
    ok: bool
    retry: bool  # when not ok: worth trying again
    error: str = ""


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def alert(notice: dict[str, Any], *, now: float, ttl_s: float) -> dict[str, Any]:
    """The Alertmanager API v2 alert for a notice."""
    resolved = notice["status"] == "resolved"
    return {
        "labels": {
            "alertname": ALERT_NAMES.get(notice["kind"], "Heald"),
            "heald_key": notice["key"],
            "kind": notice["kind"],
            "node": notice["node"],
            "site": notice["site"],
            "severity": notice["severity"],
        },
        "annotations": {"summary": notice["summary"], "description": notice["summary"]},
        "startsAt": _iso(notice["ts"] if not resolved else notice.get("fired_ts", notice["ts"])),
        "endsAt": _iso(now if resolved else now + ttl_s),
    }


def slack_text(notice: dict[str, Any]) -> str:
    """One line; ``&``, ``<`` and ``>`` escaped as Slack asks, so that what a node wrote cannot
    become a mention (``<!channel>``) or a link."""
    mark = "RESOLVED" if notice["status"] == "resolved" else notice["severity"].upper()
    text = f"[{mark}] heald {notice['kind']}: {notice['summary']}"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def request_for(
    route: NotifyRoute, notices: list[dict[str, Any]], *, replica: str, now: float, ttl_s: float
) -> tuple[str, Any, dict[str, str]]:
    """(url, JSON body, headers) of one POST. Alertmanager takes several notices at once; the
    webhook kinds take exactly one."""
    headers: dict[str, str] = {}
    if route.kind == "alertmanager":
        body: Any = [alert(n, now=now, ttl_s=ttl_s) for n in notices]
        return route.url.rstrip("/") + "/api/v2/alerts", body, headers
    (notice,) = notices
    headers["Idempotency-Key"] = f"{notice['key']}:{notice['status']}"
    if route.kind == "slack":
        return route.url, {"text": slack_text(notice)}, headers
    return route.url, {"version": 1, "coordinator": replica, **notice}, headers


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str], *, timeout_s: float
) -> SendResult:
    """POST ``body`` as JSON; what came of it."""
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if 200 <= resp.status < 300:
                return SendResult(ok=True, retry=False)
            text = (await resp.text(errors="replace"))[:200]
            retry = not (400 <= resp.status < 500) or resp.status in RETRYABLE_4XX
            return SendResult(ok=False, retry=retry, error=f"HTTP {resp.status}: {text}")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return SendResult(ok=False, retry=True, error=f"{type(exc).__name__}: {exc}"[:500])
