"""The notification outbox: a table in the coordinator's store (``notify_outbox``).

One row per (route, dedup key, status): the key is stable, ``<kind>:<node>:<id>`` (an escalation's
row id, an approval's id, the birth/death sequence of a node's offline episode), and the status
is ``firing`` or ``resolved``. Rows are inserted with ``ON CONFLICT DO NOTHING``, so a notice is
queued once however often the store is scanned, by however many replicas, and across restarts;
a row is claimed before it is sent (``claimed_until``; ``FOR UPDATE SKIP LOCKED`` in PostgreSQL)
and ends ``sent`` or ``failed``, so a restart neither loses nor repeats one.

The scan reads what the ingest already stores: ``escalations`` (open / resolved), ``approvals``
(pending / decided) and ``nodes`` (offline from the node's will or offline status / online).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

from coordinator.config import SEVERITIES, NotifySection
from coordinator.store.database import Cursor, Database, DbRow, iter_chunks

#: Each look at the store goes back this far before the previous one began: a write committed
#: late, or stamped by another replica whose clock lags.
SCAN_OVERLAP_S: Final = 10.0
#: A claimed row is left to its claimer this long past the send timeout.
CLAIM_MARGIN_S: Final = 30.0

_INSERT: Final = (
    "INSERT INTO notify_outbox (route, dedup_key, status, kind, node, severity, notice, state, "
    "next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT DO NOTHING RETURNING id"
)


@dataclass(frozen=True, slots=True)
class Notice:
    """Something that should reach people: firing, or resolved."""

    key: str  # stable: <kind>:<node>:<id>
    status: str  # "firing" | "resolved"
    kind: str  # "escalation" | "approval" | "offline"
    node: str
    site: str
    summary: str
    details: dict[str, Any]
    ts: float

    def as_dict(self, severity: str) -> dict[str, Any]:
        return {
            "key": self.key,
            "status": self.status,
            "kind": self.kind,
            "severity": severity,
            "node": self.node,
            "site": self.site,
            "summary": self.summary,
            "details": self.details,
            "ts": self.ts,
        }


@dataclass(frozen=True, slots=True)
class Claimed:
    """An outbox row claimed for sending."""

    id: int
    route: str
    key: str
    status: str
    attempts: int
    notice: dict[str, Any]


def _escalation(row: DbRow) -> Notice:
    node = row["node"] or f"group:{row['grp']}"
    what = f"playbook {row['playbook']}" if row["playbook"] else "fleet"
    return Notice(
        key=f"escalation:{node}:{row['id']}",
        status="firing" if row["state"] == "open" else "resolved",
        kind="escalation",
        node=node,
        site=row["site"] or "",
        summary=f"{node}: {what} escalated: {row['reason']}"[:500],
        details={"escalation_id": row["id"], "scope": row["scope"], "group": row["grp"],
                 "playbook": row["playbook"], "reason": row["reason"], "resolved_by": row["resolved_by"]},
        ts=float(row["ts"]),
    )


def _approval(row: DbRow) -> Notice:
    return Notice(
        key=f"approval:{row['node']}:{row['id']}",
        status="firing" if row["state"] == "pending" else "resolved",
        kind="approval",
        node=row["node"],
        site=row["site"],
        summary=f"{row['node']}: approval awaited: {row['playbook']}/{row['action']}: {row['message']}"[:500],
        details={"approval_id": row["id"], "run_id": row["run_id"], "playbook": row["playbook"],
                 "action": row["action"], "state": row["state"], "decided_by": row["decided_by"]},
        ts=float(row["requested_at"]),
    )


def _offline(row: DbRow) -> Notice:
    return Notice(
        key=f"offline:{row['node']}:{row['status_bdseq']}",
        status="firing",
        kind="offline",
        node=row["node"],
        site=row["site"],
        summary=f"{row['node']}: offline ({row['status_reason'] or 'no reason given'})"[:500],
        details={"reason": row["status_reason"], "last_seen": row["last_seen"], "bdseq": row["status_bdseq"]},
        ts=float(row["last_seen"]),
    )


class Outbox:
    """The ``notify_outbox`` table: filling it from the store's state, claiming and settling rows."""

    def __init__(self, db: Database, cfg: NotifySection) -> None:
        self.db = db
        self.cfg = cfg
        self._since = {"escalations": 0.0, "approvals": 0.0, "nodes": 0.0}

    def severity(self, kind: str) -> str:
        return str(getattr(self.cfg.severity, kind))

    def _routes_for(self, kind: str) -> list[str]:
        rank = SEVERITIES.index(self.severity(kind))
        return [r.name for r in self.cfg.routes
                if kind in r.events and SEVERITIES.index(r.min_severity) <= rank]

    async def scan(self) -> int:
        """Queue the notices the store's state calls for; the number of rows queued.

        The look is a read (the store's writer, which the ingest needs, is taken only when there
        is something new to queue), of the rows changed since the last look (all of them at the
        first), less what the outbox already holds."""
        notices, since = await self.db.read(self._collect)
        queued = await self.db.write(lambda cur: self._queue_all(cur, notices)) if notices else 0
        self._since = since
        return queued

    def _collect(self, cur: Cursor) -> tuple[list[Notice], dict[str, float]]:
        start = time.time()
        since = self._since
        notices = [_escalation(r) for r in self.db.rows(
            cur,
            "SELECT e.id, e.scope, e.node, e.grp, e.playbook, e.reason, e.ts, e.state, e.resolved_by, "
            "COALESCE(n.site, '') AS site FROM escalations e LEFT JOIN nodes n ON n.node = e.node "
            "WHERE e.updated_at >= ? ORDER BY e.id",
            (since["escalations"],),
        )]
        notices += [_approval(r) for r in self.db.rows(
            cur,
            "SELECT id, node, site, run_id, playbook, action, message, requested_at, state, decided_by "
            "FROM approvals WHERE updated_at >= ? ORDER BY requested_at",
            (since["approvals"],),
        )]
        notices += [_offline(r) for r in self.db.rows(
            cur,
            "SELECT node, site, status_bdseq, status_reason, last_seen FROM nodes "
            "WHERE updated_at >= ? AND online = 0 ORDER BY node",
            (since["nodes"],),
        )]
        notices += self._back_online(cur, start)
        known: set[tuple[str, str]] = set()
        keys = sorted({n.key for n in notices})
        for chunk in iter_chunks(keys, 500):
            marks = ", ".join("?" * len(chunk))
            known.update((r["dedup_key"], r["status"]) for r in self.db.rows(
                cur, f"SELECT DISTINCT dedup_key, status FROM notify_outbox WHERE dedup_key IN ({marks})",  # noqa: S608
                chunk,
            ))
        fresh = [n for n in notices if (n.key, n.status) not in known
                 and (n.status == "firing" or (n.key, "firing") in known)]  # resolve only what fired
        # next time from a little before now: a write committed late, or another replica's clock
        return fresh, dict.fromkeys(since, start - SCAN_OVERLAP_S)

    def _back_online(self, cur: Cursor, now: float) -> list[Notice]:
        """Resolves for the offline episodes notified and not resolved whose node is online now."""
        open_ = self.db.rows(
            cur,
            "SELECT DISTINCT f.node, f.dedup_key, f.notice FROM notify_outbox f "
            "JOIN nodes n ON n.node = f.node AND n.online = 1 WHERE f.kind = 'offline' "
            "AND f.status = 'firing' AND NOT EXISTS (SELECT 1 FROM notify_outbox r WHERE "
            "r.route = f.route AND r.dedup_key = f.dedup_key AND r.status = 'resolved') ORDER BY f.node",
        )
        out = []
        for row in open_:
            fired = json.loads(row["notice"])
            out.append(Notice(key=row["dedup_key"], status="resolved", kind="offline", node=row["node"],
                              site=fired["site"], summary=f"{row['node']}: back online",
                              details=fired["details"], ts=now))
        return out

    def _queue_all(self, cur: Cursor, notices: list[Notice]) -> int:
        now = time.time()
        return sum(self._queue(cur, notice, now) for notice in notices)

    def _queue(self, cur: Cursor, notice: Notice, now: float) -> int:
        severity = self.severity(notice.kind)
        routes = self._routes_for(notice.kind)
        if notice.status == "resolved":  # only where it fired, and where the route wants resolves
            wants = {r.name for r in self.cfg.routes if r.send_resolved}
            fired = {r["route"] for r in self.db.rows(
                cur, "SELECT route FROM notify_outbox WHERE dedup_key = ? AND status = 'firing'",
                (notice.key,),
            )}
            routes = [r for r in routes if r in wants and r in fired]
        body = json.dumps(notice.as_dict(severity), sort_keys=True, allow_nan=False)
        rows = [(route, notice.key, notice.status, notice.kind, notice.node, severity, body, now, now)
                for route in routes]
        if not rows:
            return 0
        return sum(1 for key in self.db.insert_new(cur, _INSERT, rows) if key is not None)

    # ------------------------------------------------------------------ sending

    async def claim(self, limit: int = 50) -> list[Claimed]:
        """Rows due now, claimed for this replica until the send has surely ended. A resolve
        waits for its firing notice on the same route to be settled, so it never overtakes it."""
        return await self.db.write(lambda cur: self._claim(cur, limit))

    def _claim(self, cur: Cursor, limit: int) -> list[Claimed]:
        now = time.time()
        lock = " FOR UPDATE SKIP LOCKED" if self.db.is_postgres else ""
        routes = [r.name for r in self.cfg.routes]  # a route gone from the config: its rows wait for it
        marks = ", ".join("?" * len(routes))
        rows = self.db.rows(
            cur,
            "SELECT o.id, o.route, o.dedup_key, o.status, o.attempts, o.notice FROM notify_outbox o "  # noqa: S608
            f"WHERE o.route IN ({marks}) AND o.state = 'pending' AND o.next_at <= ? AND o.claimed_until <= ? "
            "AND NOT ("
            "o.status = 'resolved' AND EXISTS (SELECT 1 FROM notify_outbox f WHERE f.route = o.route "
            "AND f.dedup_key = o.dedup_key AND f.status = 'firing' AND f.state = 'pending')) "
            f"ORDER BY o.id LIMIT ?{lock}",
            (*routes, now, now, limit),
        )
        until = now + self.cfg.timeout_s + CLAIM_MARGIN_S
        self.db.execute_many(cur, "UPDATE notify_outbox SET claimed_until = ? WHERE id = ?",
                             [(until, r["id"]) for r in rows])
        return [Claimed(id=int(r["id"]), route=r["route"], key=r["dedup_key"], status=r["status"],
                        attempts=int(r["attempts"]), notice=json.loads(r["notice"])) for r in rows]

    async def settle(self, outcomes: list[tuple[Claimed, str, str, float]]) -> None:
        """Record sends, in one transaction: per row, ``(row, state, error, retry_in)``, the state
        ``sent``, ``failed`` (given up) or ``pending`` (tried again in ``retry_in`` seconds)."""
        now = time.time()
        params = [(state, error[:1000], now + retry_in, now if state == "sent" else None,
                   now if state == "sent" else 0.0, row.id) for row, state, error, retry_in in outcomes]
        await self.db.write(lambda cur: self.db.execute_many(
            cur,
            "UPDATE notify_outbox SET state = ?, attempts = attempts + 1, claimed_until = 0, "
            "last_error = ?, next_at = ?, sent_at = ?, refreshed_at = ? WHERE id = ?",
            params,
        ))

    async def firing_alerts(self, route: str, older_than: float) -> list[tuple[int, dict[str, Any]]]:
        """(id, notice) of the alerts sent on ``route`` that are still firing (nothing resolved them)
        and were last sent before ``older_than``: Alertmanager must hear of them again."""
        rows = await self.db.read(lambda cur: self.db.rows(
            cur,
            "SELECT f.id, f.notice FROM notify_outbox f WHERE f.route = ? AND f.status = 'firing' "
            "AND f.state = 'sent' AND f.refreshed_at < ? AND NOT EXISTS (SELECT 1 FROM notify_outbox r "
            "WHERE r.route = f.route AND r.dedup_key = f.dedup_key AND r.status = 'resolved') ORDER BY f.id",
            (route, older_than),
        ))
        return [(int(r["id"]), json.loads(r["notice"])) for r in rows]

    async def refreshed(self, ids: list[int]) -> None:
        now = time.time()
        await self.db.write(lambda cur: self.db.execute_many(
            cur, "UPDATE notify_outbox SET refreshed_at = ? WHERE id = ?", [(now, i) for i in ids]))

    async def counts(self) -> dict[str, int]:
        rows = await self.db.read(lambda cur: self.db.rows(
            cur, "SELECT state, COUNT(*) AS n FROM notify_outbox GROUP BY state"))
        return {r["state"]: int(r["n"]) for r in rows}
