"""The API's read queries: the fleet list, one node, its series, history pages, change cursors.

Every query runs on a reader thread (:meth:`Database.read`) and returns rows in their API form
(:mod:`coordinator.store.rows`). A node counts as online only when its last presence message
said so *and* it was heard from within ``[store] stale_after_s``, so a node that vanished without
a will message still shows offline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from coordinator.config import StoreSection
from coordinator.errors import NotFound
from coordinator.store.database import Cursor, Database
from coordinator.store.rows import (
    ChangeCursor,
    MetricSeries,
    NodeDetail,
    NodePage,
    NodeSummary,
    RiskPoint,
    TableName,
    TableRow,
    api_row,
    api_rows,
)

#: ``GET /api/nodes?sort=``: API name -> column (only these names reach the SQL).
NODE_SORTS: Final = {
    "node": "node",
    "site": "site",
    "risk": "anomaly",
    "anomaly": "anomaly",
    "last_seen": "last_seen",
    "online": "online_now",
    "version": "agent_version",
    "agent_version": "agent_version",
    "incidents": "open_incidents",
    "open_incidents": "open_incidents",
    "alert": "alert",
}
_TABLES: Final = frozenset(
    {"actions", "events", "audit", "approvals", "escalations", "leases", "commands", "incidents"}
)
#: The histories shown with a node, in the order the API sends them: table, order, how many.
_NODE_HISTORIES: Final = (
    ("incidents", "id DESC", 20),
    ("actions", "id DESC", 50),
    ("events", "id DESC", 50),
    ("commands", "issued_at DESC", 50),
    ("approvals", "requested_at DESC", 50),
    ("escalations", "id DESC", 20),
    ("leases", "granted_at DESC", 20),
    ("audit", "id DESC", 50),
)
#: The tables :meth:`Queries.counts` reports, in the order the API sends them.
_COUNTED: Final = (
    "nodes",
    "metrics",
    "risk",
    "events",
    "actions",
    "presence",
    "acks",
    "commands",
    "approvals",
    "escalations",
    "leases",
    "audit",
)


@dataclass(frozen=True)
class NodeQuery:
    """``GET /api/nodes``'s filters, sort and page."""

    site: str = ""
    label: tuple[str, str] | None = None
    q: str = ""  # substring of the node name or hostname
    state: str = ""  # "", online, offline, alert, silenced
    sort: str = "risk"  # a key of NODE_SORTS; anything else sorts by risk
    descending: bool = True
    offset: int = 0
    limit: int = 50


class Queries:
    """The read side of the store."""

    def __init__(self, db: Database, settings: StoreSection) -> None:
        self.db = db
        self.settings = settings

    def _node_where(self, q: NodeQuery, now: float) -> tuple[str, list[Any]]:
        """``q``'s filters as a WHERE clause (every value a bound parameter) and its parameters."""
        where: list[str] = []
        params: list[Any] = []
        if q.site:
            where.append("site = ?")
            params.append(q.site)
        if q.label is not None:
            where.append("node IN (SELECT node FROM node_labels WHERE key = ? AND value = ?)")
            params.extend(q.label)
        if q.q:
            where.append("(lower(node) LIKE ? OR lower(hostname) LIKE ?)")
            like = "%" + q.q.lower().replace("\\", "").replace("%", "").replace("_", "") + "%"
            params.extend([like, like])
        stale = now - self.settings.stale_after_s
        if q.state == "online":
            where.append("online = 1 AND last_seen >= ?")
            params.append(stale)
        elif q.state == "offline":
            where.append("(online = 0 OR last_seen < ?)")
            params.append(stale)
        elif q.state == "alert":
            where.append("alert = 1")
        elif q.state == "silenced":
            where.append("silenced_until > ?")
            params.append(now)
        return (" WHERE " + " AND ".join(where)) if where else "", params

    async def list_nodes(self, q: NodeQuery) -> NodePage:
        """One page of nodes matching ``q``, with the site list and fleet-wide counts."""

        def run(cur: Cursor) -> NodePage:
            now = time.time()
            where, params = self._node_where(q, now)
            stale = now - self.settings.stale_after_s
            total = int(self.db.scalar(cur, f"SELECT count(*) FROM nodes{where}", params) or 0)  # noqa: S608
            col = NODE_SORTS.get(q.sort, "anomaly")
            direction = "DESC" if q.descending else "ASC"
            nulls = " NULLS LAST" if direction == "DESC" else " NULLS FIRST"
            # where/col/direction are built from whitelisted names; every value is a bound parameter
            rows = self.db.rows(
                cur,
                "SELECT node, site, hostname, agent_version, model_version, labels, online, status_reason, "  # noqa: S608
                "last_seen, first_seen, anomaly, alert, cold, explanation, open_incidents, last_action, "
                "silenced_until, spool_pending, dropped_metrics, metric_gaps, pending_site, "
                "CASE WHEN online = 1 AND last_seen >= ? THEN 1 ELSE 0 END AS online_now "
                f"FROM nodes{where} ORDER BY {col} {direction}{nulls}, node ASC LIMIT ? OFFSET ?",
                [stale, *params, q.limit, q.offset],
            )
            items: list[NodeSummary] = []
            for r in rows:
                r["online"] = bool(r.pop("online_now"))
                r["explanation"] = (json.loads(r["explanation"]) or [])[:3]
                items.append(cast(NodeSummary, api_row(r)))
            self._open_escalations(cur, items)
            counts = (
                self.db.one(
                    cur,
                    "SELECT count(*) AS total, "
                    "sum(CASE WHEN online = 1 AND last_seen >= ? THEN 1 ELSE 0 END) AS online, "
                    # an offline node's last alert is stale: it does not count as at risk now
                    "sum(CASE WHEN alert = 1 AND online = 1 AND last_seen >= ? THEN 1 ELSE 0 END) AS alert, "
                    "(SELECT count(*) FROM escalations WHERE state = 'open') AS escalations FROM nodes",
                    (stale, stale),
                )
                or {}
            )
            sites = [
                r["site"]
                for r in self.db.rows(cur, "SELECT DISTINCT site FROM nodes ORDER BY site LIMIT 1000")
            ]
            return {
                "total": total,
                "offset": q.offset,
                "limit": q.limit,
                "items": items,
                "sites": sites,
                "fleet": {
                    "nodes": int(counts.get("total") or 0),
                    "online": int(counts.get("online") or 0),
                    "alert": int(counts.get("alert") or 0),
                    "escalations": int(counts.get("escalations") or 0),
                },
            }

        return await self.db.read(run)

    async def get_node(self, node: str) -> NodeDetail:
        """A node's current state and the latest rows of each of its histories."""

        def run(cur: Cursor) -> NodeDetail:
            row = self.db.one(cur, "SELECT * FROM nodes WHERE node = ?", (node,))
            if row is None:
                raise NotFound(f"no node {node!r}")
            now = time.time()
            out = api_row(row)
            out["online"] = bool(row["online"]) and row["last_seen"] >= now - self.settings.stale_after_s
            for k in ("status_bdseq", "status_off", "status_seq", "risk_seq", "action_seq",
                      "last_sample_seq"):
                out.pop(k, None)
            for table, order, limit in _NODE_HISTORIES:
                # table and order come from _NODE_HISTORIES; the node is a bound parameter
                sql = f"SELECT * FROM {table} WHERE node = ? ORDER BY {order} LIMIT {limit}"  # noqa: S608
                out[table] = [api_row(r) for r in self.db.rows(cur, sql, (node,))]
            self._approval_targets(cur, out["approvals"])
            return cast(NodeDetail, out)

        return await self.db.read(run)

    async def node_metrics(self, node: str, since: float, limit: int = 2000) -> MetricSeries:
        """The node's last ``limit`` samples at or after ``since``, oldest first."""

        def run(cur: Cursor) -> MetricSeries:
            rows = self.db.rows(
                cur,
                "SELECT samples FROM metrics WHERE node = ? AND last_wall >= ? "
                "ORDER BY last_wall DESC LIMIT ?",
                (node, since, limit),
            )
            samples: list[list[Any]] = []
            for r in reversed(rows):
                samples.extend([s[0], s[1]] for s in json.loads(r["samples"]) if s[0] >= since)
            samples.sort(key=lambda s: s[0])
            names = sorted({k for s in samples for k in s[1]})
            return {"node": node, "names": names, "samples": samples[-limit:]}

        return await self.db.read(run)

    async def node_risk(self, node: str, since: float, limit: int = 2000) -> list[RiskPoint]:
        """The node's last ``limit`` risk reports at or after ``since``, oldest first."""

        def run(cur: Cursor) -> list[RiskPoint]:
            rows = self.db.rows(
                cur,
                "SELECT seq, ts, anomaly, alert, cold, model_version, explanation, failure, "
                "forecasts FROM risk WHERE node = ? AND ts >= ? ORDER BY ts DESC LIMIT ?",
                (node, since, limit),
            )
            return api_rows(rows[::-1], RiskPoint)

        return await self.db.read(run)

    async def table(
        self,
        name: TableName,
        *,
        where: str = "",
        params: Sequence[Any] = (),
        order: str = "id DESC",
        limit: int = 100,
        offset: int = 0,
    ) -> list[TableRow]:
        """A page of one history table; ``where`` and ``order`` are SQL from code, ``params`` bound."""
        if name not in _TABLES:  # the name goes into the SQL: refuse anything else, typed or not
            raise ValueError(name)
        # table, where and order come from code (whitelisted table, fixed clauses), values are bound
        sql = f"SELECT * FROM {name}{' WHERE ' + where if where else ''} ORDER BY {order} LIMIT ? OFFSET ?"  # noqa: S608

        def run(cur: Cursor) -> list[dict[str, Any]]:
            found = [api_row(r) for r in self.db.rows(cur, sql, [*params, limit, offset])]
            if name == "approvals":
                self._approval_targets(cur, found)
            return found

        return [cast(TableRow, r) for r in await self.db.read(run)]

    def _open_escalations(self, cur: Cursor, items: list[NodeSummary]) -> None:
        """Add each listed node's open escalations: how many, and the newest's reason and time.
        One query for the page's nodes (a correlated subquery per node cost seconds at 10,000
        nodes sorted by risk: SQLite computed it for every row before sorting)."""
        per_node: dict[str, list[dict[str, Any]]] = {n["node"]: [] for n in items}
        if per_node:
            marks = ", ".join("?" * len(per_node))
            for e in self.db.rows(
                cur,
                # marks is only "?, ?, ..."; every node name is a bound parameter
                f"SELECT node, reason, ts FROM escalations WHERE state = 'open' AND node IN ({marks}) "  # noqa: S608
                "ORDER BY id DESC",
                list(per_node),
            ):
                per_node[e["node"]].append(e)
        for n in items:
            found = per_node.get(n["node"]) or []
            n["open_escalations"] = len(found)
            n["escalation"] = found[0]["reason"] if found else None
            n["escalation_ts"] = max(e["ts"] for e in found) if found else None

    def _approval_targets(self, cur: Cursor, approvals: list[dict[str, Any]]) -> None:
        """Add each approval's ``target``: what the run would act on (the process, mount, unit...),
        from the labels of the node's ``approval_request`` event (the same node and seq). The
        engine names it in ``labels.acts_on`` (``stop_process: stress-ng (pid 4242, ...)``) and
        ``labels.target`` (``playbook[var=value,...]``, shown when it says more than the playbook's
        name); older agents sent only the bindings, which are shown instead; "" when the event is
        gone (retention)."""
        for a in approvals:
            labels_json = self.db.scalar(
                cur, "SELECT labels FROM events WHERE node = ? AND seq = ?", (a["node"], a["seq"])
            )
            labels = json.loads(labels_json) if isinstance(labels_json, str) else {}
            labels = labels if isinstance(labels, dict) else {}
            key = str(labels.get("target") or "")
            named = [str(labels.get("acts_on") or ""), key if key != a["playbook"] else ""]
            target = " · ".join(t for t in named if t)
            if not target and not key:
                skip = {"request_id", "run_id", "playbook", "action", "severity", "acts_on"}
                target = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in skip)
            a["target"] = target

    async def cursor(self) -> ChangeCursor:
        """Change cursors: the live stream compares them to tell clients what to refetch."""

        def run(cur: Cursor) -> ChangeCursor:
            row = self.db.one(
                cur,
                "SELECT (SELECT max(updated_at) FROM nodes) AS nodes, "
                "(SELECT max(id) FROM actions) AS actions, (SELECT max(id) FROM events) AS events, "
                "(SELECT max(updated_at) FROM approvals) AS approvals, "
                "(SELECT max(updated_at) FROM escalations) AS escalations, "
                "(SELECT max(updated_at) FROM commands) AS commands, "
                "(SELECT max(id) FROM audit) AS audit",
            )
            return cast(ChangeCursor, row or {})

        return await self.db.read(run)

    async def changed_nodes(self, since: float, limit: int = 200) -> list[str]:
        """Nodes updated after ``since`` (a ``nodes`` cursor), most recent first."""
        rows = await self.db.read(
            lambda cur: self.db.rows(
                cur,
                "SELECT node FROM nodes WHERE updated_at > ? ORDER BY updated_at DESC LIMIT ?",
                (since, limit),
            )
        )
        return [r["node"] for r in rows]

    async def counts(self) -> dict[str, int]:
        """Rows per table (``GET /api/info``)."""

        def run(cur: Cursor) -> dict[str, int]:
            out: dict[str, int] = {}
            for t in _COUNTED:
                out[t] = int(self.db.scalar(cur, f"SELECT count(*) FROM {t}") or 0)  # noqa: S608
            return out

        return await self.db.read(run)
