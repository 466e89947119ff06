"""Notifications: escalations, approvals awaited and nodes gone offline reach people.

:class:`Notifier` runs beside the ingest (``coordinator.service`` starts it when ``[notify]``
has routes). Three loops:

- **scan**: every ``poll_interval_s``, what changed in the store (escalations, approvals, nodes)
  becomes rows of the durable outbox (:mod:`.outbox`), one per route the notice's kind and
  severity go to, deduplicated by a stable key;
- **send**: due rows are claimed and POSTed (:mod:`.send`); a failure is retried with exponential
  backoff and jitter, and given up after ``max_attempts`` (counted in :attr:`NotifyStats.failed`
  and logged);
- **refresh**: firing alerts are sent to Alertmanager again before they would expire there.

Nothing from the config is executed; URLs are only POSTed to.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import structlog

from coordinator.config import NotifyRoute, NotifySection, notify_tokens
from coordinator.notify.outbox import Claimed, Outbox
from coordinator.notify.send import post, request_for
from coordinator.store.database import Database

log = structlog.get_logger("coordinator.notify")


@dataclass
class NotifyStats:
    queued: int = 0
    sent: int = 0
    retries: int = 0
    failed: int = 0  # given up
    refreshed: int = 0
    scan_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def backoff(cfg: NotifySection, attempt: int, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1, 2, ...): ``backoff_s`` doubling up to
    ``backoff_max_s``, with ±25 % jitter so that retries of many notices do not arrive together."""
    base = min(cfg.backoff_max_s, cfg.backoff_s * 2.0 ** (attempt - 1))
    return float(base * rng.uniform(0.75, 1.25))


class Notifier:
    """Sends what the store's state calls for to the configured routes."""

    def __init__(self, cfg: NotifySection, db: Database, *, replica: str) -> None:
        self.cfg = cfg
        self.replica = replica
        self.outbox = Outbox(db, cfg)
        self.routes: dict[str, NotifyRoute] = {r.name: r for r in cfg.routes}
        self._auth = {name: f"Bearer {token}" for name, token in notify_tokens(cfg).items()}
        self.stats = NotifyStats()
        self.wake = asyncio.Event()
        self._rng = random.Random()  # noqa: S311 - jitter, not a secret

    def info(self) -> dict[str, Any]:
        return {"routes": sorted(self.routes), **self.stats.as_dict()}

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
            tg.create_task(self._scan_loop(), name="notify-scan")
            tg.create_task(self._send_loop(session), name="notify-send")
            if any(r.kind == "alertmanager" for r in self.cfg.routes):
                tg.create_task(self._refresh_loop(session), name="notify-refresh")

    async def _scan_loop(self) -> None:
        while True:
            try:
                queued = await self.outbox.scan()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not stop notifications
                self.stats.scan_errors += 1
                log.error("notify scan failed", error=str(exc), error_type=type(exc).__name__)
            else:
                if queued:
                    self.stats.queued += queued
                    self.wake.set()
            await asyncio.sleep(self.cfg.poll_interval_s)

    async def _send_loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                rows = await self.outbox.claim()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - as above
                log.error("notify claim failed", error=str(exc), error_type=type(exc).__name__)
                rows = []
            if rows:
                outcomes = await asyncio.gather(*(self._send(session, row) for row in rows))
                try:
                    await self.outbox.settle(outcomes)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the claims lapse and the rows are sent again
                    log.error("notify settle failed", error=str(exc), error_type=type(exc).__name__)
                continue
            self.wake.clear()
            try:  # a new notice, or a retry falling due
                async with asyncio.timeout(min(1.0, self.cfg.backoff_s)):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def _send(self, session: aiohttp.ClientSession, row: Claimed) -> tuple[Claimed, str, str, float]:
        """POST one claimed row; its outcome for :meth:`Outbox.settle`."""
        route = self.routes[row.route]
        url, body, headers = request_for(route, [row.notice], replica=self.replica, now=time.time(),
                                         ttl_s=4 * self.cfg.alertmanager_refresh_s)
        if row.route in self._auth:
            headers["Authorization"] = self._auth[row.route]
        result = await post(session, url, body, headers, timeout_s=self.cfg.timeout_s)
        attempt = row.attempts + 1
        fields = {"route": row.route, "key": row.key, "status": row.status, "attempt": attempt}
        if result.ok:
            self.stats.sent += 1
            log.info("notification sent", **fields)
            return row, "sent", "", 0.0
        if result.retry and attempt < self.cfg.max_attempts:
            self.stats.retries += 1
            delay = backoff(self.cfg, attempt, self._rng)
            log.warning("notification failed, will retry", error=result.error, retry_in_s=round(delay, 2),
                        **fields)
            return row, "pending", result.error, delay
        self.stats.failed += 1
        log.error("notification given up", error=result.error, **fields)
        return row, "failed", result.error, 0.0

    async def _refresh_loop(self, session: aiohttp.ClientSession) -> None:
        every = self.cfg.alertmanager_refresh_s
        while True:
            await asyncio.sleep(every / 4)
            for route in self.cfg.routes:
                if route.kind != "alertmanager":
                    continue
                try:
                    firing = await self.outbox.firing_alerts(route.name, time.time() - every)
                    if not firing:
                        continue
                    url, body, headers = request_for(route, [n for _, n in firing], replica=self.replica,
                                                     now=time.time(), ttl_s=4 * every)
                    if route.name in self._auth:
                        headers["Authorization"] = self._auth[route.name]
                    result = await post(session, url, body, headers, timeout_s=self.cfg.timeout_s)
                    if result.ok:
                        await self.outbox.refreshed([i for i, _ in firing])
                        self.stats.refreshed += len(firing)
                    else:
                        log.warning("alertmanager refresh failed", route=route.name, error=result.error)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.error("alertmanager refresh failed", route=route.name, error=str(exc))


__all__ = ["Notifier", "NotifyStats", "backoff"]
