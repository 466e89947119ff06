"""Applying report batches: history rows, each node's current state, and the events' side effects.

Exactly-once: every report kind has a history table keyed ``(node, seq)``; a batch inserts each
message with ``ON CONFLICT DO NOTHING`` and applies the side effects (node state, incidents,
approvals, escalations, lease requests) only for the rows it actually inserted, in the same
transaction. Two replicas that both receive a message (a retained status, a QoS 1 redelivery,
a spool replay) therefore process it once. Node rows are locked in node order (``FOR UPDATE`` in
PostgreSQL) before they are merged, so replicas never interleave on one node.

Ordering: inside a batch messages are applied in ``(node, seq)`` order, and the current-state
columns only move forward — risk by ``seq``, presence by ``(bdseq, offline, seq)`` — so late
replays land in the history without rolling the current state back.

Lease requests are only collected here (:attr:`BatchResult.lease_requests`); they are decided
after the batch commits, by :mod:`coordinator.store.leases`.

Isolation: one report the database will not take (a data error, :func:`is_data_error`: a
constraint, a value out of a column's range, a NUL in a PostgreSQL string) never costs the other
reports of its batch. The batch is applied under a savepoint; on a data error it is rolled back
to it and each half is applied the same way, down to the single report, which is left out and
returned in :attr:`BatchResult.rejected` (the ingest counts it for its node). The others are
stored in the same transaction, in the same order: k bad reports among n cost about 2k·log2(n)
extra attempts, the first of them only when the whole batch failed. Other errors (a lock, a lost
connection) abort the transaction as before and the ingest retries the batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from itertools import compress
from operator import itemgetter, ne
from typing import Any, Final

from agent.wire import Action, Birth, CommandAck, Cost, Event, Message, Metrics, RequestEvent, Risk, Status
from coordinator.config import BudgetSection
from coordinator.model import BatchResult, Incoming, LeaseRequest, StoreRejected, is_escalation
from coordinator.store import cost, incarnations
from coordinator.store.database import Cursor, Database, DbRow, is_data_error
from coordinator.store.leases import group_of
from coordinator.store.rows import dumps
from coordinator.store.schema import NODE_COLUMNS

#: Kinds the broker retains: their ``ts`` is when the node sent them, not a measure of ingest lag.
_RETAINED: Final = frozenset({"birth", "status"})

_PRESENCE_INSERT: Final = (
    "INSERT INTO presence (node, seq, ts, kind, state, bdseq, reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq"
)
#: Per report kind, the statement adding it to its history table: a duplicate ``(node, seq)``
#: inserts nothing and returns no row. The values come from :func:`_history_row`.
_HISTORY_INSERTS: Final = {
    "birth": _PRESENCE_INSERT,
    "status": _PRESENCE_INSERT,
    "metrics": "INSERT INTO metrics (node, seq, ts, first_wall, last_wall, samples) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq",
    "risk": "INSERT INTO risk (node, seq, ts, sample_seq, anomaly, alert, cold, model_version, "
    "explanation, failure, forecasts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING RETURNING seq",
    "event": "INSERT INTO events (node, site, seq, ts, wall, name, source, labels, value, message) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
    "action": "INSERT INTO actions (node, site, seq, ts, run_id, playbook, step, action, phase, dry_run, "
    "outcome, result, error, duration_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING RETURNING id",
    "command_ack": "INSERT INTO acks (node, seq, ts, command_id, status, message, result) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq",
    "cost": cost.INSERT,
}
#: The ``nodes`` columns a batch may change (written back only where they did).
_UPDATED_COLUMNS: Final = tuple(c for c in NODE_COLUMNS if c != "node")
_UPDATED_VALUES: Final = itemgetter(*_UPDATED_COLUMNS)
#: Per report kind, its history table and where ``node`` and ``seq`` sit in :func:`_history_row`.
_HISTORY_KEYS: Final = {
    "birth": ("presence", 0, 1),
    "status": ("presence", 0, 1),
    "metrics": ("metrics", 0, 1),
    "risk": ("risk", 0, 1),
    "event": ("events", 0, 2),
    "action": ("actions", 0, 2),
    "command_ack": ("acks", 0, 1),
    "cost": ("cost", 0, 1),
}


def _history_row(m: Message) -> tuple[Any, ...]:
    """One report's values for its :data:`_HISTORY_INSERTS` statement."""
    match m:
        case Birth():
            return (m.node, m.seq, m.ts, "birth", "online", m.bdseq, m.agent_version)
        case Status():
            return (m.node, m.seq, m.ts, "status", m.state, m.bdseq, m.reason)
        case Metrics():
            samples = [[s.wall, s.metrics, s.seq] for s in m.samples]  # the seq: gaps can be checked
            first = m.samples[0].wall if m.samples else m.ts
            last = m.samples[-1].wall if m.samples else m.ts
            return (m.node, m.seq, m.ts, first, last, dumps(samples))
        case Risk():
            return (
                m.node,
                m.seq,
                m.ts,
                m.sample_seq,
                m.anomaly,
                int(m.alert),
                int(m.cold),
                m.model_version,
                dumps(m.explanation),
                dumps(m.failure),
                dumps(m.forecasts),
            )
        case Event():
            return (
                m.node,
                m.site,
                m.seq,
                m.ts,
                m.wall,
                m.name,
                m.source,
                dumps(m.labels),
                m.value,
                m.message,
            )
        case Action():
            return (
                m.node,
                m.site,
                m.seq,
                m.ts,
                m.run_id,
                m.playbook,
                m.step,
                m.action,
                m.phase,
                int(m.dry_run),
                m.outcome,
                dumps(m.result),
                m.error,
                m.duration_s,
            )
        case CommandAck():
            return (m.node, m.seq, m.ts, m.command_id, m.status, m.message, dumps(m.result))
        case Cost():
            return cost.history_row(m)
    raise TypeError(f"no history table for {type(m).__name__}")  # pragma: no cover - see _HISTORY_INSERTS


def approval_id(node: str, request_id: str) -> str:
    """The id an approval request is stored under: the node's own request id when it is the
    node's (agents name their requests ``<node>-...``), else that id prefixed with the node, so
    that no node can claim another node's approval first."""
    return request_id if request_id.startswith(node + "-") else f"{node}-{request_id}"


def node_escalation_key(node: str, playbook: str, run_id: str) -> str | None:
    """The ``escalations.open_key`` of a node's escalation: one row per (node, playbook, run).

    A node may send one run's escalation more than once under different ``seq``s (agents up to
    0.1.0 publish it both as an audit record and as an event; a resend after a restart), so the
    ``(node, seq)`` dedupe alone does not make it one row. Unlike a fleet escalation's key, this
    one is kept when the escalation is resolved: the run stays escalated once. An escalation
    without a run id (``""`` or the ``"-"`` placeholder) has no key and is always stored.
    """
    if run_id in ("", "-"):
        return None
    return "node:" + dumps([node, playbook, run_id])


class Reports:
    """Writes report batches into the history tables and the ``nodes`` rows."""

    def __init__(self, db: Database, budget: BudgetSection) -> None:
        self.db = db
        self.budget = budget

    async def apply(self, batch: Sequence[Incoming]) -> BatchResult:
        """Store one batch in one transaction; count new and duplicate messages, collect lease requests.
        A report the database refuses is left out and listed in the result's ``rejected``."""
        return await self.db.write(lambda cur: self._apply_isolating(cur, batch))

    def _apply_isolating(self, cur: Cursor, batch: Sequence[Incoming]) -> BatchResult:
        result = BatchResult()
        self._apply_part(cur, sorted(batch, key=lambda i: (i.message.node, i.message.seq)), result)
        return result

    def _apply_part(self, cur: Cursor, items: Sequence[Incoming], result: BatchResult) -> None:
        """Apply ``items`` under a savepoint; on a data error, roll back to it and apply each half
        the same way, down to the one report the database refuses (see the module docstring)."""
        self.db.execute(cur, "SAVEPOINT batch_part")
        try:
            part = self._apply(cur, items)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            self.db.execute(cur, "ROLLBACK TO SAVEPOINT batch_part")
            self.db.execute(cur, "RELEASE SAVEPOINT batch_part")
            if len(items) == 1:
                m = items[0].message
                error = f"{type(exc).__name__}: {exc}"[:1000]
                result.rejected.append(StoreRejected(node=m.node, kind=items[0].kind, seq=m.seq, error=error))
            else:
                half = len(items) // 2
                self._apply_part(cur, items[:half], result)
                self._apply_part(cur, items[half:], result)
            return
        self.db.execute(cur, "RELEASE SAVEPOINT batch_part")
        result.add(part)

    def _apply(self, cur: Cursor, batch: Sequence[Incoming]) -> BatchResult:
        result = BatchResult()
        now = time.time()
        ordered = sorted(batch, key=lambda i: (i.message.node, i.message.seq))
        nodes, created = self._lock_nodes(cur, ordered, now)
        before = {name: dict(row) for name, row in nodes.items()}  # to write back only what changed
        # The seqs as stored: (node, incarnation, seq) -> (node, base + seq); seq jumps quarantined.
        kept = incarnations.Incarnations(self.db, cur).assign(ordered, nodes, result)
        kept.sort(key=lambda i: (i.message.node, i.message.seq))
        by_kind: dict[str, list[Incoming]] = {}
        for item in kept:
            by_kind.setdefault(item.kind, []).append(item)
        new: list[Incoming] = []
        for kind, items in by_kind.items():
            inserted = self._insert_history(cur, kind, items)
            for item, ok in zip(items, inserted, strict=True):
                if ok is None:
                    result.duplicates += 1
                else:
                    new.append(item)
        new.sort(key=lambda i: (i.message.node, i.message.seq))
        self._apply_state(cur, new, nodes, before, created=created, now=now, result=result)
        result.new = len(new)
        done = time.time()
        result.lags = [
            max(0.0, done - i.message.ts) for i in new if i.kind not in _RETAINED
        ]  # retained: old ts
        return result

    def _insert_history(self, cur: Cursor, kind: str, items: list[Incoming]) -> list[Any]:
        """Insert into ``kind``'s history table; per item, its key if new or None if a duplicate."""
        sql = _HISTORY_INSERTS.get(kind)
        if sql is None:
            return [None] * len(items)  # commands are not reports: never stored from the bus
        rows = [_history_row(i.message) for i in items]
        table, node_at, seq_at = _HISTORY_KEYS[kind]
        return self.db.insert_absent(cur, sql, table, rows, node_at=node_at, seq_at=seq_at)

    def _lock_nodes(self, cur: Cursor, items: Sequence[Incoming],
                    now: float) -> tuple[dict[str, DbRow], set[str]]:
        """The ``nodes`` rows of the batch's nodes, created if new and locked in node order; and
        the names of the rows this batch created."""
        first: dict[str, Incoming] = {}
        for i in items:
            first.setdefault(i.message.node, i)
        names = sorted(first)
        # The rows there now, locked in node order (on SQLite, the one writer: they are there at
        # commit). The rest are inserted (ON CONFLICT: another replica may have just done so) and
        # then locked; only a batch with new nodes pays for those two statements.
        out = self._select_nodes(cur, names)
        missing = [n for n in names if n not in out]
        if not missing:
            return out, set()
        sql = ("INSERT INTO nodes (node, site, first_seen, last_seen, updated_at) VALUES (?, ?, ?, ?, ?) "
               "ON CONFLICT DO NOTHING RETURNING node")
        rows = [(n, first[n].message.site, first[n].received_at, first[n].received_at, now) for n in missing]
        if self.db.is_postgres:
            inserted = self.db.pg_insert_new(cur, sql, "nodes", rows, ("node",))
        else:
            inserted = self.db.insert_new(cur, sql, rows)
        created = {name for name, key in zip(missing, inserted, strict=True) if key is not None}
        out.update(self._select_nodes(cur, missing))
        return out, created

    def _select_nodes(self, cur: Cursor, names: Sequence[str]) -> dict[str, DbRow]:
        """The ``nodes`` rows of ``names`` (sorted), locked in node order on PostgreSQL."""
        lock = f" ORDER BY node{self.db.dialect.for_update}"
        rows = self.db.rows_in(cur, "SELECT * FROM nodes", "node", names, lock)
        return {row["node"]: row for row in rows}

    def _apply_state(self, cur: Cursor, items: list[Incoming], nodes: dict[str, DbRow],
                     before: dict[str, DbRow], *, created: set[str], now: float, result: BatchResult) -> None:
        """Merge the new messages into their (locked) nodes' rows and write what they cause, in batches."""
        labels_changed: dict[str, dict[str, str]] = {}
        incidents_open: list[tuple[Any, ...]] = []
        incidents_close: list[tuple[Any, ...]] = []
        approvals: list[tuple[Any, ...]] = []
        escalations: list[tuple[Any, ...]] = []
        releases: list[tuple[Any, ...]] = []
        acks: list[tuple[Any, ...]] = []
        for item in items:
            m = item.message
            n = nodes[m.node]
            if m.site != n["site"] and m.node not in created:
                # A node does not move itself to another site (and another blast-radius budget
                # group): the claim waits for an operator (POST /api/nodes/{node}/site).
                n["pending_site"] = m.site
            if m.inc != n["inc"]:
                incarnations.switch(n, m.inc)
            n["last_seen"] = max(n["last_seen"], item.received_at)
            if isinstance(m, Birth):
                if m.bdseq >= n["bdseq"]:
                    n.update(
                        hostname=m.hostname,
                        agent_version=m.agent_version,
                        model_version=m.model_version,
                        labels=dumps(m.labels),
                        capabilities=dumps(m.capabilities),
                        collectors=dumps(m.collectors),
                        bdseq=m.bdseq,
                    )
                    labels_changed[m.node] = dict(m.labels)
                    key = (m.bdseq, 0, m.seq)
                    if key > (n["status_bdseq"], n["status_off"], n["status_seq"]):
                        n.update(
                            online=1, status_bdseq=m.bdseq, status_off=0, status_seq=m.seq, status_reason=""
                        )
            elif isinstance(m, Status):
                key = (m.bdseq, int(m.state == "offline"), m.seq)
                if key > (n["status_bdseq"], n["status_off"], n["status_seq"]):
                    n.update(
                        online=int(m.state == "online"),
                        status_bdseq=key[0],
                        status_off=key[1],
                        status_seq=key[2],
                        status_reason=m.reason,
                        spool_pending=m.spool_pending,
                        dropped_metrics=m.dropped_metrics,
                    )
            elif isinstance(m, Risk):
                if m.seq > n["risk_seq"]:
                    was_alert = bool(n["alert"])
                    n.update(
                        risk_seq=m.seq,
                        risk_ts=m.ts,
                        anomaly=m.anomaly,
                        alert=int(m.alert),
                        cold=int(m.cold),
                        explanation=dumps(m.explanation),
                        failure=dumps(m.failure),
                        forecasts=dumps(m.forecasts),
                        model_version=m.model_version or n["model_version"],
                    )
                    if m.alert and not was_alert:
                        top = ", ".join(f"{c.feature} {c.share:.0%}" for c in m.explanation[:3])
                        incidents_open.append((m.node, m.ts, f"risk alert (anomaly {m.anomaly}): {top}"))
                        n["open_incidents"] = int(n["open_incidents"]) + 1
                    elif not m.alert and was_alert:
                        incidents_close.append((m.ts, m.node))
                        n["open_incidents"] = 0
            elif isinstance(m, Metrics):
                incarnations.count_gaps(n, m.samples)
            elif isinstance(m, Action):
                if m.seq > n["action_seq"]:
                    what = m.outcome if m.phase == "finished" and m.outcome else m.phase
                    dry = " (dry-run)" if m.dry_run else ""
                    n.update(action_seq=m.seq, last_action=f"{m.playbook}/{m.action}: {what}{dry}")
            elif isinstance(m, Event):
                self._event_side_effects(
                    m, n, now, approvals=approvals, escalations=escalations, releases=releases, result=result
                )
            elif isinstance(m, CommandAck):
                # only the node a command went to (or one in its broadcast) may set its status
                acks.append((m.status, m.message, now, m.command_id, m.node, n["site"]))
            n["updated_at"] = now
        touched = {i.message.node for i in items} | {r.node for r in result.rejected if r.reason != "store"}
        updates: dict[tuple[str, ...], list[list[Any]]] = {}  # by the columns that changed
        for name, n in sorted(nodes.items()):
            if name in touched:
                changed = map(ne, _UPDATED_VALUES(n), _UPDATED_VALUES(before[name]))
                cols = tuple(compress(_UPDATED_COLUMNS, changed))
                if cols:
                    updates.setdefault(cols, []).append([n[c] for c in cols] + [name])
        for cols, rows in updates.items():
            self.db.update_rows(cur, "nodes", ("node",), cols, rows)
        for node, labels in sorted(labels_changed.items()):
            self.db.execute(cur, "DELETE FROM node_labels WHERE node = ?", (node,))
            if labels:
                self.db.execute_many(
                    cur,
                    "INSERT INTO node_labels (node, key, value) VALUES (?, ?, ?)",
                    [(node, k, v) for k, v in sorted(labels.items())],
                )
        if incidents_open:
            self.db.execute_many(
                cur, "INSERT INTO incidents (node, opened_at, reason) VALUES (?, ?, ?)", incidents_open
            )
        if incidents_close:
            self.db.execute_many(
                cur,
                "UPDATE incidents SET closed_at = ? WHERE node = ? AND closed_at IS NULL",
                incidents_close,
            )
        if approvals:
            self.db.insert_new(
                cur,
                "INSERT INTO approvals (id, node, site, seq, run_id, playbook, action, message, "
                "requested_at, state, updated_at, request_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                approvals,
            )
        if escalations:  # one per (node, playbook, run): a repeat for the same run adds nothing
            self.db.execute_many(
                cur,
                "INSERT INTO escalations (scope, node, grp, playbook, reason, ts, state, open_key, "
                "updated_at) VALUES ('node', ?, ?, ?, ?, ?, 'open', ?, ?) ON CONFLICT DO NOTHING",
                escalations,
            )
        if releases:
            self.db.execute_many(
                cur,
                "UPDATE leases SET released_at = ?, release_reason = 'released by node' "
                "WHERE id = ? AND node = ? AND released_at IS NULL",
                releases,
            )
        if acks:
            self.db.execute_many(
                cur,
                "UPDATE commands SET status = ?, status_message = ?, updated_at = ? WHERE id = ? "
                "AND (node = ? OR (node = '*' AND (site = '*' OR site = ?)))",
                acks,
            )

    def _event_side_effects(
        self,
        m: Event,
        n: DbRow,
        now: float,
        *,
        approvals: list[tuple[Any, ...]],
        escalations: list[tuple[Any, ...]],
        releases: list[tuple[Any, ...]],
        result: BatchResult,
    ) -> None:
        """What a request or escalation event asks for: collected into the lists the caller writes."""
        labels = m.labels
        if m.name == RequestEvent.LEASE_REQUEST:
            result.lease_requests.append(
                LeaseRequest(
                    node=m.node,
                    site=n["site"],  # the node's site as the coordinator knows it, not as claimed
                    seq=m.seq,
                    request_id=labels.get("request_id", f"{m.node}-{m.seq}"),
                    playbook=labels.get("playbook", m.source or "?"),
                    run_id=labels.get("run_id", ""),
                    ttl_s=m.value,
                    ts=m.ts,
                )
            )
        elif m.name == RequestEvent.LEASE_RELEASE:
            releases.append((now, labels.get("lease_id", ""), m.node))
        elif m.name == RequestEvent.APPROVAL_REQUEST:
            request_id = labels.get("request_id") or str(m.seq)
            approvals.append(
                (
                    approval_id(m.node, request_id),
                    m.node,
                    n["site"],
                    m.seq,
                    labels.get("run_id", ""),
                    labels.get("playbook", ""),
                    labels.get("action", ""),
                    m.message,
                    m.wall,
                    now,
                    request_id,
                )
            )
        elif is_escalation(m.name):
            labels_of_node = json.loads(n["labels"])
            playbook = labels.get("playbook", "")
            escalations.append(
                (
                    m.node,
                    group_of(self.budget, n["site"], labels_of_node),
                    playbook,
                    m.message or m.name,
                    m.wall,
                    node_escalation_key(m.node, playbook, labels.get("run_id", "")),
                    now,
                )
            )
