"""Fleet state in SQLite (default) or PostgreSQL (``postgresql://`` URL; shared by replicas).

Threading: every write runs on one dedicated writer thread (a single-worker executor) with its
own connection, so the event loop never blocks on the database and SQLite never sees two
writers in one process. Reads run on a small reader pool, one connection per thread (SQLite in
WAL mode lets them proceed during writes).

Exactly-once: every report kind has a history table keyed ``(node, seq)``; a batch inserts each
message with ``ON CONFLICT DO NOTHING`` and applies the side effects (node state, incidents,
approvals, escalations, lease requests) only for the rows it actually inserted, in the same
transaction. Two replicas that both receive a message (a retained status, a QoS 1 redelivery,
a spool replay) therefore process it once. Node rows are locked in node order (``FOR UPDATE`` in
PostgreSQL) before they are merged, and lease decisions take a per-group advisory lock, so
replicas never interleave on one node or one budget.

Ordering: inside a batch messages are applied in ``(node, seq)`` order, and the current-state
columns only move forward — risk by ``seq``, presence by ``(bdseq, offline, seq)`` — so late
replays land in the history without rolling the current state back.

SQL is written once with ``?`` placeholders; the PostgreSQL dialect rewrites them to ``%s``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import math
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import msgspec

from agent.wire import Action, Birth, CommandAck, Event, Metrics, Risk, Status
from agent.wire.messages import Command
from coordinator.config import BudgetSection, StoreSection
from coordinator.errors import Conflict, NotFound, StoreError
from coordinator.model import (
    APPROVAL_REQUEST,
    LEASE_RELEASE,
    LEASE_REQUEST,
    BatchResult,
    Incoming,
    LeaseDecision,
    LeaseOutcome,
    LeaseRequest,
    Revocation,
    Row,
    is_escalation,
)

T = TypeVar("T")

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
  node TEXT PRIMARY KEY,
  site TEXT NOT NULL,
  hostname TEXT NOT NULL DEFAULT '',
  agent_version TEXT NOT NULL DEFAULT '',
  model_version TEXT NOT NULL DEFAULT '',
  labels TEXT NOT NULL DEFAULT '{}',
  capabilities TEXT NOT NULL DEFAULT '[]',
  collectors TEXT NOT NULL DEFAULT '[]',
  bdseq BIGINT NOT NULL DEFAULT -1,
  online INTEGER NOT NULL DEFAULT 0,
  status_bdseq BIGINT NOT NULL DEFAULT -1,
  status_off INTEGER NOT NULL DEFAULT 0,
  status_seq BIGINT NOT NULL DEFAULT -1,
  status_reason TEXT NOT NULL DEFAULT '',
  spool_pending BIGINT NOT NULL DEFAULT 0,
  dropped_metrics BIGINT NOT NULL DEFAULT 0,
  first_seen DOUBLE PRECISION NOT NULL,
  last_seen DOUBLE PRECISION NOT NULL,
  risk_seq BIGINT NOT NULL DEFAULT -1,
  risk_ts DOUBLE PRECISION,
  anomaly DOUBLE PRECISION,
  alert INTEGER NOT NULL DEFAULT 0,
  cold INTEGER NOT NULL DEFAULT 1,
  explanation TEXT NOT NULL DEFAULT '[]',
  failure TEXT NOT NULL DEFAULT '{}',
  forecasts TEXT NOT NULL DEFAULT '[]',
  open_incidents INTEGER NOT NULL DEFAULT 0,
  action_seq BIGINT NOT NULL DEFAULT -1,
  last_action TEXT NOT NULL DEFAULT '',
  silenced_until DOUBLE PRECISION NOT NULL DEFAULT 0,
  updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS nodes_site ON nodes (site, node);
CREATE INDEX IF NOT EXISTS nodes_updated ON nodes (updated_at);
CREATE TABLE IF NOT EXISTS node_labels (
  node TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (node, key)
);
CREATE INDEX IF NOT EXISTS node_labels_kv ON node_labels (key, value);
CREATE TABLE IF NOT EXISTS presence (
  node TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
  state TEXT NOT NULL, bdseq BIGINT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (node, seq)
);
CREATE TABLE IF NOT EXISTS metrics (
  node TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
  first_wall DOUBLE PRECISION NOT NULL, last_wall DOUBLE PRECISION NOT NULL, samples TEXT NOT NULL,
  PRIMARY KEY (node, seq)
);
CREATE INDEX IF NOT EXISTS metrics_node_wall ON metrics (node, last_wall);
CREATE TABLE IF NOT EXISTS risk (
  node TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, sample_seq BIGINT NOT NULL,
  anomaly DOUBLE PRECISION, alert INTEGER NOT NULL, cold INTEGER NOT NULL, model_version TEXT NOT NULL,
  explanation TEXT NOT NULL, failure TEXT NOT NULL, forecasts TEXT NOT NULL, PRIMARY KEY (node, seq)
);
CREATE INDEX IF NOT EXISTS risk_node_ts ON risk (node, ts);
CREATE TABLE IF NOT EXISTS events (
  id {ID}, node TEXT NOT NULL, site TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
  wall DOUBLE PRECISION NOT NULL, name TEXT NOT NULL, source TEXT NOT NULL, labels TEXT NOT NULL,
  value DOUBLE PRECISION, message TEXT NOT NULL, UNIQUE (node, seq)
);
CREATE INDEX IF NOT EXISTS events_node ON events (node, id);
CREATE TABLE IF NOT EXISTS actions (
  id {ID}, node TEXT NOT NULL, site TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
  run_id TEXT NOT NULL, playbook TEXT NOT NULL, step TEXT NOT NULL, action TEXT NOT NULL,
  phase TEXT NOT NULL, dry_run INTEGER NOT NULL, outcome TEXT, result TEXT NOT NULL, error TEXT NOT NULL,
  duration_s DOUBLE PRECISION, UNIQUE (node, seq)
);
CREATE INDEX IF NOT EXISTS actions_node ON actions (node, id);
CREATE TABLE IF NOT EXISTS acks (
  node TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, command_id TEXT NOT NULL,
  status TEXT NOT NULL, message TEXT NOT NULL, result TEXT NOT NULL, PRIMARY KEY (node, seq)
);
CREATE TABLE IF NOT EXISTS commands (
  id TEXT PRIMARY KEY, node TEXT NOT NULL, site TEXT NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL,
  issuer TEXT NOT NULL, issued_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
  actor TEXT NOT NULL, status TEXT NOT NULL, status_message TEXT NOT NULL DEFAULT '',
  updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_node ON commands (node, issued_at);
CREATE INDEX IF NOT EXISTS commands_updated ON commands (updated_at);
CREATE TABLE IF NOT EXISTS approvals (
  id TEXT PRIMARY KEY, node TEXT NOT NULL, site TEXT NOT NULL, seq BIGINT NOT NULL,
  run_id TEXT NOT NULL, playbook TEXT NOT NULL, action TEXT NOT NULL, message TEXT NOT NULL,
  requested_at DOUBLE PRECISION NOT NULL, state TEXT NOT NULL, decided_by TEXT NOT NULL DEFAULT '',
  decided_at DOUBLE PRECISION, command_id TEXT NOT NULL DEFAULT '', updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_state ON approvals (state, requested_at);
CREATE INDEX IF NOT EXISTS approvals_updated ON approvals (updated_at);
CREATE TABLE IF NOT EXISTS escalations (
  id {ID}, scope TEXT NOT NULL, node TEXT NOT NULL, grp TEXT NOT NULL, playbook TEXT NOT NULL,
  reason TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, state TEXT NOT NULL, nodes TEXT NOT NULL DEFAULT '[]',
  resolved_by TEXT NOT NULL DEFAULT '', resolved_at DOUBLE PRECISION, open_key TEXT UNIQUE,
  updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS escalations_state ON escalations (state, id);
CREATE INDEX IF NOT EXISTS escalations_updated ON escalations (updated_at);
CREATE TABLE IF NOT EXISTS incidents (
  id {ID}, node TEXT NOT NULL, opened_at DOUBLE PRECISION NOT NULL, closed_at DOUBLE PRECISION,
  reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS incidents_node ON incidents (node, closed_at);
CREATE TABLE IF NOT EXISTS leases (
  id TEXT PRIMARY KEY, node TEXT NOT NULL, site TEXT NOT NULL, grp TEXT NOT NULL, playbook TEXT NOT NULL,
  request_id TEXT NOT NULL, granted_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
  released_at DOUBLE PRECISION, release_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS leases_grp ON leases (grp, expires_at);
CREATE TABLE IF NOT EXISTS lease_requests (
  node TEXT NOT NULL, seq BIGINT NOT NULL, grp TEXT NOT NULL, playbook TEXT NOT NULL,
  request_id TEXT NOT NULL,
  ts DOUBLE PRECISION NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (node, seq)
);
CREATE INDEX IF NOT EXISTS lease_requests_grp ON lease_requests (grp, playbook, ts);
CREATE TABLE IF NOT EXISTS audit (
  id {ID}, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL, replica TEXT NOT NULL, action TEXT NOT NULL,
  node TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_node ON audit (node, id);
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY, csrf TEXT NOT NULL, actor TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  expires_at DOUBLE PRECISION NOT NULL
);
"""

_NODE_COLUMNS: Final = (
    "node",
    "site",
    "hostname",
    "agent_version",
    "model_version",
    "labels",
    "capabilities",
    "collectors",
    "bdseq",
    "online",
    "status_bdseq",
    "status_off",
    "status_seq",
    "status_reason",
    "spool_pending",
    "dropped_metrics",
    "first_seen",
    "last_seen",
    "risk_seq",
    "risk_ts",
    "anomaly",
    "alert",
    "cold",
    "explanation",
    "failure",
    "forecasts",
    "open_incidents",
    "action_seq",
    "last_action",
    "silenced_until",
    "updated_at",
)
_JSON_COLUMNS: Final = frozenset(
    {
        "labels",
        "capabilities",
        "collectors",
        "explanation",
        "failure",
        "forecasts",
        "result",
        "args",
        "samples",
        "nodes",
        "detail",
    }
)
_BOOL_COLUMNS: Final = frozenset({"online", "alert", "cold", "dry_run"})
_NODE_SORTS: Final = {
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

_json_encoder = msgspec.json.Encoder()
_RETAINED: Final = frozenset({"birth", "status"})


def dumps(value: Any) -> str:
    return _json_encoder.encode(value).decode()


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _row_out(row: Row) -> Row:
    """DB row -> API object: JSON columns decoded, 0/1 columns as booleans."""
    out: Row = {}
    for k, v in row.items():
        if k in _JSON_COLUMNS and isinstance(v, str):
            out[k] = json.loads(v)
        elif k in _BOOL_COLUMNS and v is not None:
            out[k] = bool(v)
        else:
            out[k] = v
    return out


def group_of(budget: BudgetSection, site: str, labels: dict[str, str]) -> str:
    """The blast-radius group of a node: ``site:<site>`` or ``<label>:<value>``."""
    if budget.group_by == "site":
        return f"site:{site}"
    label = budget.group_by.partition(":")[2]
    return f"{label}:{labels.get(label, '-')}"


@dataclass(frozen=True)
class NodeQuery:
    site: str = ""
    label: tuple[str, str] | None = None
    q: str = ""
    state: str = ""  # "", online, offline, alert, silenced
    sort: str = "risk"
    descending: bool = True
    offset: int = 0
    limit: int = 50


class _Dialect:
    name = "sqlite"
    id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"
    for_update = ""

    def sql(self, text: str) -> str:
        return text


class _PgDialect(_Dialect):
    name = "postgresql"
    id_column = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    for_update = " FOR UPDATE"

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def sql(self, text: str) -> str:
        out = self._cache.get(text)
        if out is None:
            out = self._cache[text] = text.replace("%", "%%").replace("?", "%s")
        return out


class Store:
    """The coordinator's store. Use :func:`open_store`; call the ``async`` methods from the loop."""

    def __init__(self, url: str, settings: StoreSection, budget: BudgetSection, *, replica: str = "") -> None:
        self.url = url
        self.settings = settings
        self.budget = budget
        self.replica = replica
        if url.startswith(("postgresql://", "postgres://")):
            self.dialect: _Dialect = _PgDialect()
            self.path: Path | None = None
        elif url.startswith("sqlite:///"):
            self.dialect = _Dialect()
            self.path = Path(url.removeprefix("sqlite://"))
        else:
            raise StoreError(f"unsupported store URL {url!r} (sqlite:///PATH or postgresql://...)")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._readers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="store-reader")
        self._local = threading.local()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()

    @property
    def is_postgres(self) -> bool:
        return self.dialect.name == "postgresql"

    # ------------------------------------------------------------------ connections

    def _connect(self, *, writer: bool) -> Any:
        if self.is_postgres:
            try:
                import psycopg  # noqa: PLC0415 - only PostgreSQL deployments need it
            except ImportError:
                raise StoreError("a postgresql:// store needs psycopg 3: pip install 'heald[postgres]'") \
                    from None

            try:
                conn: Any = psycopg.connect(self.url, autocommit=not writer, connect_timeout=10)
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to PostgreSQL {_redact(self.url)}: {exc}") from None
        else:
            if self.path is None:  # pragma: no cover - set for every non-PostgreSQL URL
                raise StoreError("no SQLite path")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=30000")
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"cannot open SQLite database {self.path}: {exc}") from None
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _conn(self, *, writer: bool) -> Any:
        attr = "writer" if writer else "reader"
        conn = getattr(self._local, attr, None)
        if conn is None:
            conn = self._connect(writer=writer)
            setattr(self._local, attr, conn)
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction on the writer thread's connection."""
        conn = self._conn(writer=True)
        if self.is_postgres:
            with conn.transaction():
                yield conn.cursor()
        else:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _run_write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(cursor)`` in a transaction, retrying PostgreSQL deadlocks/serialization failures."""
        for attempt in range(5):
            try:
                with self._tx() as cur:
                    return fn(cur)
            except Exception as exc:
                if self.is_postgres and _is_retryable(exc) and attempt < 4:
                    time.sleep(0.01 * (attempt + 1) + secrets.randbelow(20) / 1000)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write(self, fn: Callable[[Any], T]) -> T:
        import asyncio  # noqa: PLC0415

        return await asyncio.get_running_loop().run_in_executor(self._writer, self._run_write, fn)

    def _run_read(self, fn: Callable[[Any], T]) -> T:
        conn = self._conn(writer=False)
        cur = conn.cursor()
        try:
            return fn(cur)
        finally:
            cur.close()

    async def _read(self, fn: Callable[[Any], T]) -> T:
        import asyncio  # noqa: PLC0415

        return await asyncio.get_running_loop().run_in_executor(self._readers, self._run_read, fn)

    def _x(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self.dialect.sql(sql), params)
        return cur

    def _rows(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._x(cur, sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def _one(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self._rows(cur, sql, params)
        return rows[0] if rows else None

    def _scalar(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        self._x(cur, sql, params)
        row = cur.fetchone()
        return None if row is None else row[0]

    def _insert_new(self, cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """Insert rows with ``ON CONFLICT DO NOTHING RETURNING <col>``: per row, the value or None."""
        if not rows:
            return []
        if self.is_postgres:
            cur.executemany(self.dialect.sql(sql), rows, returning=True)
            out: list[Any] = []
            while True:
                got = cur.fetchone()
                out.append(None if got is None else got[0])
                if not cur.nextset():
                    break
            return out
        out = []
        stmt = self.dialect.sql(sql)
        for row in rows:
            cur.execute(stmt, row)
            got = cur.fetchone()
            out.append(None if got is None else got[0])
        return out

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await self._write(self._create_schema)

    def _create_schema(self, cur: Any) -> None:
        ddl = _SCHEMA.replace("{ID}", self.dialect.id_column)
        if self.is_postgres:
            cur.execute("SELECT pg_advisory_xact_lock(4242001)")  # replicas starting together
        for stmt in ddl.split(";"):
            if stmt.strip():
                cur.execute(stmt)
        version = self._scalar(cur, "SELECT value FROM meta WHERE key = 'schema'")
        if version is None:
            self._x(
                cur,
                "INSERT INTO meta (key, value) VALUES ('schema', ?) ON CONFLICT DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
        elif int(version) > SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version} is newer than this coordinator ({SCHEMA_VERSION})"
            )

    async def close(self) -> None:
        import asyncio  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    # ------------------------------------------------------------------ ingest

    async def apply(self, batch: Sequence[Incoming]) -> BatchResult:
        return await self._write(lambda cur: self._apply(cur, batch))

    def _apply(self, cur: Any, batch: Sequence[Incoming]) -> BatchResult:
        result = BatchResult()
        ordered = sorted(batch, key=lambda i: (i.message.node, i.message.seq))
        by_kind: dict[str, list[Incoming]] = {}
        for item in ordered:
            by_kind.setdefault(item.kind, []).append(item)
        new: list[Incoming] = []
        for kind, items in by_kind.items():
            inserted = self._insert_history(cur, kind, items)
            for item, ok in zip(items, inserted, strict=True):
                if ok is None:
                    result.duplicates += 1
                else:
                    new.append(item)
        if not new:
            return result
        new.sort(key=lambda i: (i.message.node, i.message.seq))
        now = time.time()
        self._apply_state(cur, new, now, result)
        result.new = len(new)
        done = time.time()
        result.lags = [
            max(0.0, done - i.message.ts) for i in new if i.kind not in _RETAINED
        ]  # retained: old ts
        return result

    def _insert_history(self, cur: Any, kind: str, items: list[Incoming]) -> list[Any]:
        if kind in ("birth", "status"):
            rows: list[tuple[Any, ...]] = []
            for i in items:
                m = i.message
                if isinstance(m, Birth):
                    rows.append((m.node, m.seq, m.ts, "birth", "online", m.bdseq, m.agent_version))
                elif isinstance(m, Status):
                    rows.append((m.node, m.seq, m.ts, "status", m.state, m.bdseq, m.reason))
            return self._insert_new(
                cur,
                "INSERT INTO presence (node, seq, ts, kind, state, bdseq, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq",
                rows,
            )
        if kind == "metrics":
            rows = []
            for i in items:
                m = cast(Metrics, i.message)
                samples = [[s.wall, s.metrics] for s in m.samples]
                first = m.samples[0].wall if m.samples else m.ts
                last = m.samples[-1].wall if m.samples else m.ts
                rows.append((m.node, m.seq, m.ts, first, last, dumps(samples)))
            return self._insert_new(
                cur,
                "INSERT INTO metrics (node, seq, ts, first_wall, last_wall, samples) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq",
                rows,
            )
        if kind == "risk":
            rows = []
            for i in items:
                m = cast(Risk, i.message)
                rows.append(
                    (
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
                )
            return self._insert_new(
                cur,
                "INSERT INTO risk (node, seq, ts, sample_seq, anomaly, alert, cold, model_version, "
                "explanation, failure, forecasts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING seq",
                rows,
            )
        if kind == "event":
            rows = []
            for i in items:
                m = cast(Event, i.message)
                rows.append(
                    (
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
                )
            return self._insert_new(
                cur,
                "INSERT INTO events (node, site, seq, ts, wall, name, source, labels, value, message) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                rows,
            )
        if kind == "action":
            rows = []
            for i in items:
                m = cast(Action, i.message)
                rows.append(
                    (
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
                )
            return self._insert_new(
                cur,
                "INSERT INTO actions (node, site, seq, ts, run_id, playbook, step, action, phase, dry_run, "
                "outcome, result, error, duration_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                rows,
            )
        if kind == "command_ack":
            rows = []
            for i in items:
                m = cast(CommandAck, i.message)
                rows.append((m.node, m.seq, m.ts, m.command_id, m.status, m.message, dumps(m.result)))
            return self._insert_new(
                cur,
                "INSERT INTO acks (node, seq, ts, command_id, status, message, result) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq",
                rows,
            )
        return [None] * len(items)  # commands are not reports: never stored from the bus

    def _lock_nodes(self, cur: Any, items: list[Incoming], now: float) -> dict[str, Row]:
        first: dict[str, Incoming] = {}
        for i in items:
            first.setdefault(i.message.node, i)
        names = sorted(first)
        self._insert_new(  # make sure every row exists, so FOR UPDATE can lock it
            cur,
            "INSERT INTO nodes (node, site, first_seen, last_seen, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING node",
            [(n, first[n].message.site, first[n].received_at, first[n].received_at, now) for n in names],
        )
        out: dict[str, Row] = {}
        for chunk_start in range(0, len(names), 500):
            chunk = names[chunk_start : chunk_start + 500]
            marks = ", ".join("?" * len(chunk))
            for row in self._rows(
                cur,
                f"SELECT * FROM nodes WHERE node IN ({marks}) ORDER BY node"  # noqa: S608
                f"{self.dialect.for_update}",
                chunk,
            ):
                out[row["node"]] = row
        return out

    def _apply_state(self, cur: Any, items: list[Incoming], now: float, result: BatchResult) -> None:
        nodes = self._lock_nodes(cur, items, now)
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
            n["site"] = m.site
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
                acks.append((m.status, m.message, now, m.command_id))
            n["updated_at"] = now
        sets = ", ".join(f"{c} = ?" for c in _NODE_COLUMNS if c != "node")
        cur.executemany(
            self.dialect.sql(f"UPDATE nodes SET {sets} WHERE node = ?"),  # noqa: S608
            [[n[c] for c in _NODE_COLUMNS if c != "node"] + [n["node"]] for _, n in sorted(nodes.items())],
        )
        for node, labels in sorted(labels_changed.items()):
            self._x(cur, "DELETE FROM node_labels WHERE node = ?", (node,))
            if labels:
                cur.executemany(
                    self.dialect.sql("INSERT INTO node_labels (node, key, value) VALUES (?, ?, ?)"),
                    [(node, k, v) for k, v in sorted(labels.items())],
                )
        if incidents_open:
            cur.executemany(
                self.dialect.sql("INSERT INTO incidents (node, opened_at, reason) VALUES (?, ?, ?)"),
                incidents_open,
            )
        if incidents_close:
            cur.executemany(
                self.dialect.sql("UPDATE incidents SET closed_at = ? WHERE node = ? AND closed_at IS NULL"),
                incidents_close,
            )
        if approvals:
            self._insert_new(
                cur,
                "INSERT INTO approvals (id, node, site, seq, run_id, playbook, action, message, "
                "requested_at, state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                approvals,
            )
        if escalations:
            cur.executemany(
                self.dialect.sql(
                    "INSERT INTO escalations (scope, node, grp, playbook, reason, ts, state, updated_at) "
                    "VALUES ('node', ?, ?, ?, ?, ?, 'open', ?)"
                ),
                escalations,
            )
        if releases:
            cur.executemany(
                self.dialect.sql(
                    "UPDATE leases SET released_at = ?, release_reason = 'released by node' "
                    "WHERE id = ? AND node = ? AND released_at IS NULL"
                ),
                releases,
            )
        if acks:
            cur.executemany(
                self.dialect.sql(
                    "UPDATE commands SET status = ?, status_message = ?, updated_at = ? WHERE id = ?"
                ),
                acks,
            )

    def _event_side_effects(
        self,
        m: Event,
        n: Row,
        now: float,
        *,
        approvals: list[tuple[Any, ...]],
        escalations: list[tuple[Any, ...]],
        releases: list[tuple[Any, ...]],
        result: BatchResult,
    ) -> None:
        labels = m.labels
        if m.name == LEASE_REQUEST:
            result.lease_requests.append(
                LeaseRequest(
                    node=m.node,
                    site=m.site,
                    seq=m.seq,
                    request_id=labels.get("request_id", f"{m.node}-{m.seq}"),
                    playbook=labels.get("playbook", m.source or "?"),
                    run_id=labels.get("run_id", ""),
                    ttl_s=m.value,
                    ts=m.ts,
                )
            )
        elif m.name == LEASE_RELEASE:
            releases.append((now, labels.get("lease_id", ""), m.node))
        elif m.name == APPROVAL_REQUEST:
            approvals.append(
                (
                    labels.get("request_id") or f"{m.node}-{m.seq}",
                    m.node,
                    m.site,
                    m.seq,
                    labels.get("run_id", ""),
                    labels.get("playbook", ""),
                    labels.get("action", ""),
                    m.message,
                    m.wall,
                    now,
                )
            )
        elif is_escalation(m.name):
            labels_of_node = json.loads(n["labels"])
            escalations.append(
                (
                    m.node,
                    group_of(self.budget, m.site, labels_of_node),
                    labels.get("playbook", ""),
                    m.message or m.name,
                    m.wall,
                    now,
                )
            )

    # ------------------------------------------------------------------ leases

    async def decide_leases(self, requests: Sequence[LeaseRequest]) -> LeaseOutcome:
        outcome = LeaseOutcome()
        for req in sorted(requests, key=lambda r: (r.node, r.seq)):
            await self._write(functools.partial(self._decide_lease, req=req, outcome=outcome))
        return outcome

    def _decide_lease(self, cur: Any, req: LeaseRequest, outcome: LeaseOutcome) -> None:
        b = self.budget
        now = time.time()
        node = self._one(cur, "SELECT site, labels, silenced_until FROM nodes WHERE node = ?", (req.node,))
        labels = json.loads(node["labels"]) if node else {}
        grp = group_of(b, req.site, labels)
        if self.is_postgres:
            self._x(cur, "SELECT pg_advisory_xact_lock(?)", (_lock_key(grp),))
        if b.group_by == "site":
            size = int(self._scalar(cur, "SELECT count(*) FROM nodes WHERE site = ?", (req.site,)) or 0)
        else:
            key, _, value = grp.partition(":")
            size = int(
                self._scalar(
                    cur, "SELECT count(*) FROM node_labels WHERE key = ? AND value = ?", (key, value)
                )
                or 0
            )
        size = max(size, 1)
        self._x(
            cur,
            "INSERT INTO lease_requests (node, seq, grp, playbook, request_id, ts, decision, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, 'pending', '') ON CONFLICT DO NOTHING",
            (req.node, req.seq, grp, req.playbook, req.request_id, now),
        )

        def decide(
            granted: bool,
            reason: str,
            lease_id: str = "",
            expires_at: float = 0.0,
            escalation_id: int | None = None,
        ) -> None:
            self._x(
                cur,
                "UPDATE lease_requests SET decision = ?, reason = ? WHERE node = ? AND seq = ?",
                ("granted" if granted else "denied", reason, req.node, req.seq),
            )
            outcome.decisions.append(
                LeaseDecision(req, granted, reason, lease_id, expires_at, grp, escalation_id)
            )

        open_key = f"fleet:{grp}:{req.playbook}"
        held = self._one(cur, "SELECT id FROM escalations WHERE open_key = ?", (open_key,))
        if held is not None:
            decide(
                False,
                f"held: fleet escalation #{held['id']} is open for {req.playbook} in {grp}",
                escalation_id=int(held["id"]),
            )
            return
        distinct = int(
            self._scalar(
                cur,
                "SELECT count(DISTINCT node) FROM lease_requests WHERE grp = ? AND playbook = ? AND ts >= ?",
                (grp, req.playbook, now - b.storm_window_s),
            )
            or 0
        )
        if distinct >= b.storm_min_nodes and distinct > b.storm_share * size:
            nodes = [
                r["node"]
                for r in self._rows(
                    cur,
                    "SELECT DISTINCT node FROM lease_requests WHERE grp = ? AND playbook = ? AND ts >= ? "
                    "ORDER BY node",
                    (grp, req.playbook, now - b.storm_window_s),
                )
            ]
            reason = (
                f"storm: {distinct} of {size} nodes in {grp} asked to run {req.playbook} within "
                f"{b.storm_window_s:.0f}s (limit {b.storm_share:.0%}); all held"
            )
            esc_id = self._insert_new(
                cur,
                "INSERT INTO escalations (scope, node, grp, playbook, reason, ts, state, nodes, open_key, "
                "updated_at) VALUES ('fleet', '', ?, ?, ?, ?, 'open', ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                [(grp, req.playbook, reason, now, dumps(nodes), open_key, now)],
            )[0]
            if esc_id is not None:
                outcome.escalations_raised.append(int(esc_id))
                self._audit(
                    cur,
                    "coordinator",
                    "fleet_escalation",
                    "",
                    {"id": esc_id, "group": grp, "playbook": req.playbook, "nodes": distinct},
                )
                for lease in self._rows(
                    cur,
                    "SELECT id, node, site FROM leases WHERE grp = ? AND playbook = ? "
                    "AND released_at IS NULL AND expires_at > ?",
                    (grp, req.playbook, now),
                ):
                    self._x(
                        cur,
                        "UPDATE leases SET released_at = ?, release_reason = ? WHERE id = ?",
                        (now, "revoked: storm", lease["id"]),
                    )
                    outcome.revocations.append(
                        Revocation(
                            lease["id"],
                            lease["node"],
                            lease["site"],
                            req.playbook,
                            f"storm hold (fleet escalation #{esc_id})",
                        )
                    )
            else:
                esc_id = self._scalar(cur, "SELECT id FROM escalations WHERE open_key = ?", (open_key,))
            decide(False, reason, escalation_id=None if esc_id is None else int(esc_id))
            return
        existing = self._one(
            cur,
            "SELECT id, expires_at FROM leases WHERE node = ? AND playbook = ? "
            "AND released_at IS NULL AND expires_at > ?",
            (req.node, req.playbook, now),
        )
        if existing is not None:
            decide(True, "already holds a lease", existing["id"], existing["expires_at"])
            return
        limit = max(1, min(b.max_nodes, math.floor(b.max_percent / 100.0 * size)))
        active = int(
            self._scalar(
                cur,
                "SELECT count(DISTINCT node) FROM leases WHERE grp = ? "
                "AND released_at IS NULL AND expires_at > ?",
                (grp, now),
            )
            or 0
        )
        if active >= limit:
            decide(False, f"budget: {active} of {size} nodes in {grp} are remediating (limit {limit})")
            return
        ttl = min(b.lease_ttl_s, req.ttl_s) if req.ttl_s and req.ttl_s > 0 else b.lease_ttl_s
        lease_id = secrets.token_hex(8)
        self._x(
            cur,
            "INSERT INTO leases (id, node, site, grp, playbook, request_id, granted_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (lease_id, req.node, req.site, grp, req.playbook, req.request_id, now, now + ttl),
        )
        decide(True, f"granted {active + 1} of {limit} in {grp}", lease_id, now + ttl)

    # ------------------------------------------------------------------ operator actions

    def _audit(self, cur: Any, actor: str, action: str, node: str, detail: dict[str, Any]) -> None:
        self._x(
            cur,
            "INSERT INTO audit (ts, actor, replica, action, node, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), actor, self.replica, action, node, dumps(detail)),
        )

    async def audit(
        self, actor: str, action: str, node: str = "", detail: dict[str, Any] | None = None
    ) -> None:
        await self._write(lambda cur: self._audit(cur, actor, action, node, detail or {}))

    def _record_command(self, cur: Any, cmd: Command, actor: str, status: str = "sent") -> None:
        self._x(
            cur,
            "INSERT INTO commands (id, node, site, name, args, issuer, issued_at, expires_at, actor, "
            "status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                cmd.id,
                cmd.node,
                cmd.site,
                cmd.name,
                dumps(cmd.args),
                cmd.issuer,
                cmd.issued_at,
                cmd.expires_at,
                actor,
                status,
                time.time(),
            ),
        )

    async def record_commands(self, commands: Sequence[Command], actor: str) -> None:
        def run(cur: Any) -> None:
            for cmd in commands:
                self._record_command(cur, cmd, actor)

        await self._write(run)

    async def get_approval(self, approval_id: str) -> Row:
        row = await self._read(
            lambda cur: self._one(cur, "SELECT * FROM approvals WHERE id = ?", (approval_id,))
        )
        if row is None:
            raise NotFound(f"no approval {approval_id!r}")
        return _row_out(row)

    async def decide_approval(self, approval_id: str, approve: bool, actor: str, command: Command) -> None:
        """Mark a pending approval decided and record its signed command — once, across replicas."""
        state = "approved" if approve else "denied"

        def run(cur: Any) -> None:
            now = time.time()
            self._x(
                cur,
                "UPDATE approvals SET state = ?, decided_by = ?, decided_at = ?, command_id = ?, "
                "updated_at = ? WHERE id = ? AND state = 'pending'",
                (state, actor, now, command.id, now, approval_id),
            )
            if cur.rowcount != 1:
                row = self._one(cur, "SELECT state FROM approvals WHERE id = ?", (approval_id,))
                if row is None:
                    raise NotFound(f"no approval {approval_id!r}")
                raise Conflict(f"approval {approval_id!r} is already {row['state']}")
            self._record_command(cur, command, actor)
            self._audit(
                cur,
                actor,
                state,
                command.node,
                {"approval": approval_id, "command": command.id, "args": dict(command.args)},
            )

        await self._write(run)

    async def issue_command(
        self, command: Command, actor: str, audit_action: str, silence_until: float | None = None
    ) -> None:
        def run(cur: Any) -> None:
            if self._one(cur, "SELECT node FROM nodes WHERE node = ?", (command.node,)) is None:
                raise NotFound(f"no node {command.node!r}")
            if silence_until is not None:
                self._x(
                    cur,
                    "UPDATE nodes SET silenced_until = ?, updated_at = ? WHERE node = ?",
                    (silence_until, time.time(), command.node),
                )
            self._record_command(cur, command, actor)
            self._audit(
                cur,
                actor,
                audit_action,
                command.node,
                {"command": command.id, "name": command.name, "args": dict(command.args)},
            )

        await self._write(run)

    async def resolve_escalation(self, escalation_id: int, actor: str) -> None:
        def run(cur: Any) -> None:
            now = time.time()
            self._x(
                cur,
                "UPDATE escalations SET state = 'resolved', resolved_by = ?, resolved_at = ?, "
                "open_key = NULL, updated_at = ? WHERE id = ? AND state = 'open'",
                (actor, now, now, escalation_id),
            )
            if cur.rowcount != 1:
                if self._one(cur, "SELECT id FROM escalations WHERE id = ?", (escalation_id,)) is None:
                    raise NotFound(f"no escalation {escalation_id}")
                raise Conflict(f"escalation {escalation_id} is already resolved")
            self._audit(cur, actor, "resolve_escalation", "", {"escalation": escalation_id})

        await self._write(run)

    async def node_site(self, node: str) -> str:
        row = await self._read(lambda cur: self._one(cur, "SELECT site FROM nodes WHERE node = ?", (node,)))
        if row is None:
            raise NotFound(f"no node {node!r}")
        return str(row["site"])

    # ------------------------------------------------------------------ sessions

    async def create_session(self, session_hash: str, csrf: str, actor: str, ttl_s: float) -> None:
        now = time.time()
        await self._write(
            lambda cur: self._x(
                cur,
                "INSERT INTO sessions (id, csrf, actor, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (session_hash, csrf, actor, now, now + ttl_s),
            )
        )

    async def get_session(self, session_hash: str) -> Row | None:
        row = await self._read(
            lambda cur: self._one(
                cur,
                "SELECT csrf, actor, expires_at FROM sessions WHERE id = ? AND expires_at > ?",
                (session_hash, time.time()),
            )
        )
        return row  # noqa: RET504 - typed local for readability

    async def delete_session(self, session_hash: str) -> None:
        await self._write(lambda cur: self._x(cur, "DELETE FROM sessions WHERE id = ?", (session_hash,)))

    # ------------------------------------------------------------------ retention

    async def prune(self) -> dict[str, int]:
        return await self._write(self._prune)

    def _prune(self, cur: Any) -> dict[str, int]:
        now = time.time()
        s = self.settings
        out: dict[str, int] = {}
        out["metrics"] = self._x(
            cur, "DELETE FROM metrics WHERE last_wall < ?", (now - s.metrics_retention_s,)
        ).rowcount
        out["metrics_cap"] = self._x(
            cur,
            "DELETE FROM metrics WHERE (node, seq) IN (SELECT node, seq FROM (SELECT node, seq, "
            "row_number() OVER (PARTITION BY node ORDER BY seq DESC) AS rn FROM metrics) AS ranked "
            "WHERE rn > ?)",
            (s.metrics_max_rows_per_node,),
        ).rowcount
        out["risk"] = self._x(cur, "DELETE FROM risk WHERE ts < ?", (now - s.risk_retention_s,)).rowcount
        out["presence"] = self._x(
            cur, "DELETE FROM presence WHERE ts < ?", (now - s.risk_retention_s,)
        ).rowcount
        out["lease_requests"] = self._x(
            cur, "DELETE FROM lease_requests WHERE ts < ?", (now - max(self.budget.storm_window_s * 2, 3600),)
        ).rowcount
        out["sessions"] = self._x(cur, "DELETE FROM sessions WHERE expires_at < ?", (now,)).rowcount
        self._x(
            cur,
            "UPDATE leases SET released_at = expires_at, release_reason = 'expired' "
            "WHERE released_at IS NULL AND expires_at <= ?",
            (now,),
        )
        self._x(
            cur,
            "UPDATE approvals SET state = 'expired', updated_at = ? WHERE state = 'pending' "
            "AND requested_at < ?",
            (now, now - 86400),
        )
        return out

    # ------------------------------------------------------------------ queries

    def _node_where(self, q: NodeQuery, now: float) -> tuple[str, list[Any]]:
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

    async def list_nodes(self, q: NodeQuery) -> Row:
        def run(cur: Any) -> Row:
            now = time.time()
            where, params = self._node_where(q, now)
            stale = now - self.settings.stale_after_s
            total = int(self._scalar(cur, f"SELECT count(*) FROM nodes{where}", params) or 0)  # noqa: S608
            col = _NODE_SORTS.get(q.sort, "anomaly")
            direction = "DESC" if q.descending else "ASC"
            nulls = " NULLS LAST" if direction == "DESC" else " NULLS FIRST"
            # where/col/direction are built from whitelisted names; every value is a bound parameter
            rows = self._rows(
                cur,
                "SELECT node, site, hostname, agent_version, model_version, labels, online, status_reason, "  # noqa: S608
                "last_seen, first_seen, anomaly, alert, cold, explanation, open_incidents, last_action, "
                "silenced_until, spool_pending, dropped_metrics, "
                "CASE WHEN online = 1 AND last_seen >= ? THEN 1 ELSE 0 END AS online_now "
                f"FROM nodes{where} ORDER BY {col} {direction}{nulls}, node ASC LIMIT ? OFFSET ?",
                [stale, *params, q.limit, q.offset],
            )
            items = []
            for r in rows:
                r["online"] = bool(r.pop("online_now"))
                r["explanation"] = (json.loads(r["explanation"]) or [])[:3]
                items.append(_row_out(r))
            counts = (
                self._one(
                    cur,
                    "SELECT count(*) AS total, "
                    "sum(CASE WHEN online = 1 AND last_seen >= ? THEN 1 ELSE 0 END) AS online, "
                    "sum(alert) AS alert FROM nodes",
                    (stale,),
                )
                or {}
            )
            sites = [
                r["site"] for r in self._rows(cur, "SELECT DISTINCT site FROM nodes ORDER BY site LIMIT 1000")
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
                },
            }

        return await self._read(run)

    async def get_node(self, node: str) -> Row:
        def run(cur: Any) -> Row:
            row = self._one(cur, "SELECT * FROM nodes WHERE node = ?", (node,))
            if row is None:
                raise NotFound(f"no node {node!r}")
            now = time.time()
            out = _row_out(row)
            out["online"] = bool(row["online"]) and row["last_seen"] >= now - self.settings.stale_after_s
            for k in ("status_bdseq", "status_off", "status_seq", "risk_seq", "action_seq"):
                out.pop(k, None)
            out["incidents"] = [
                _row_out(r)
                for r in self._rows(
                    cur, "SELECT * FROM incidents WHERE node = ? ORDER BY id DESC LIMIT 20", (node,)
                )
            ]
            out["actions"] = [
                _row_out(r)
                for r in self._rows(
                    cur, "SELECT * FROM actions WHERE node = ? ORDER BY id DESC LIMIT 50", (node,)
                )
            ]
            out["events"] = [
                _row_out(r)
                for r in self._rows(
                    cur, "SELECT * FROM events WHERE node = ? ORDER BY id DESC LIMIT 50", (node,)
                )
            ]
            out["commands"] = [
                _row_out(r)
                for r in self._rows(
                    cur, "SELECT * FROM commands WHERE node = ? ORDER BY issued_at DESC LIMIT 50", (node,)
                )
            ]
            out["approvals"] = [
                _row_out(r)
                for r in self._rows(
                    cur, "SELECT * FROM approvals WHERE node = ? ORDER BY requested_at DESC LIMIT 50", (node,)
                )
            ]
            out["escalations"] = [
                _row_out(r)
                for r in self._rows(
                    cur, "SELECT * FROM escalations WHERE node = ? ORDER BY id DESC LIMIT 20", (node,)
                )
            ]
            out["leases"] = [
                _row_out(r)
                for r in self._rows(
                    cur, "SELECT * FROM leases WHERE node = ? ORDER BY granted_at DESC LIMIT 20", (node,)
                )
            ]
            out["audit"] = [
                _row_out(r)
                for r in self._rows(
                    cur, "SELECT * FROM audit WHERE node = ? ORDER BY id DESC LIMIT 50", (node,)
                )
            ]
            return out

        return await self._read(run)

    async def node_metrics(self, node: str, since: float, limit: int = 2000) -> Row:
        def run(cur: Any) -> Row:
            rows = self._rows(
                cur,
                "SELECT samples FROM metrics WHERE node = ? AND last_wall >= ? "
                "ORDER BY last_wall DESC LIMIT ?",
                (node, since, limit),
            )
            samples: list[Any] = []
            for r in reversed(rows):
                samples.extend(s for s in json.loads(r["samples"]) if s[0] >= since)
            samples.sort(key=lambda s: s[0])
            names = sorted({k for _, m in samples for k in m})
            return {"node": node, "names": names, "samples": samples[-limit:]}

        return await self._read(run)

    async def node_risk(self, node: str, since: float, limit: int = 2000) -> list[Row]:
        def run(cur: Any) -> list[Row]:
            rows = self._rows(
                cur,
                "SELECT seq, ts, anomaly, alert, cold, model_version, explanation, failure, "
                "forecasts FROM risk WHERE node = ? AND ts >= ? ORDER BY ts DESC LIMIT ?",
                (node, since, limit),
            )
            return [_row_out(r) for r in reversed(rows)]

        return await self._read(run)

    async def table(
        self,
        name: str,
        *,
        where: str = "",
        params: Sequence[Any] = (),
        order: str = "id DESC",
        limit: int = 100,
        offset: int = 0,
    ) -> list[Row]:
        if name not in {
            "actions",
            "events",
            "audit",
            "approvals",
            "escalations",
            "leases",
            "commands",
            "incidents",
        }:
            raise ValueError(name)
        # table, where and order come from code (whitelisted table, fixed clauses), values are bound
        sql = f"SELECT * FROM {name}{' WHERE ' + where if where else ''} ORDER BY {order} LIMIT ? OFFSET ?"  # noqa: S608
        rows = await self._read(lambda cur: self._rows(cur, sql, [*params, limit, offset]))
        return [_row_out(r) for r in rows]

    async def cursor(self) -> Row:
        """Change cursors: the live stream compares them to tell clients what to refetch."""

        def run(cur: Any) -> Row:
            row = self._one(
                cur,
                "SELECT (SELECT max(updated_at) FROM nodes) AS nodes, "
                "(SELECT max(id) FROM actions) AS actions, (SELECT max(id) FROM events) AS events, "
                "(SELECT max(updated_at) FROM approvals) AS approvals, "
                "(SELECT max(updated_at) FROM escalations) AS escalations, "
                "(SELECT max(updated_at) FROM commands) AS commands, "
                "(SELECT max(id) FROM audit) AS audit",
            )
            return row or {}

        return await self._read(run)

    async def changed_nodes(self, since: float, limit: int = 200) -> list[str]:
        rows = await self._read(
            lambda cur: self._rows(
                cur,
                "SELECT node FROM nodes WHERE updated_at > ? ORDER BY updated_at DESC LIMIT ?",
                (since, limit),
            )
        )
        return [r["node"] for r in rows]

    async def counts(self) -> Row:
        def run(cur: Any) -> Row:
            out: Row = {}
            for t in (
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
            ):
                out[t] = int(self._scalar(cur, f"SELECT count(*) FROM {t}") or 0)  # noqa: S608
            return out

        return await self._read(run)


def _lock_key(group: str) -> int:
    """A signed 64-bit advisory-lock key for a budget group."""
    return zlib.crc32(group.encode()) + (1 << 32) * 4243


def _is_retryable(exc: BaseException) -> bool:
    try:
        import psycopg  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)


def _redact(url: str) -> str:
    """A URL without its password, for error messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{creds}{at}{host}"


async def open_store(url: str, settings: StoreSection, budget: BudgetSection, *, replica: str = "") -> Store:
    store = Store(url, settings, budget, replica=replica)
    try:
        await store.open()
    except StoreError:
        await store.close()
        raise
    except Exception as exc:
        await store.close()
        raise StoreError(f"cannot initialise the store at {_redact(url)}: {exc}") from exc
    return store


def iter_chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
