"""The store's tables, and creating them.

One history table per report kind, keyed ``(node, seq)`` (or ``UNIQUE (node, seq)``), so a
message delivered twice is stored once; ``nodes`` holds each node's current state, moved forward
only by newer messages (see :mod:`coordinator.store.reports`). ``{ID}`` is the dialect's
auto-increment primary key. :data:`SCHEMA_VERSION` is recorded in ``meta``: a coordinator refuses a
store written by a newer one.
"""

from __future__ import annotations

from typing import Final

from coordinator.errors import StoreError
from coordinator.store import cost
from coordinator.store.database import Cursor, Database

#: 3: the ``cost`` table (node cost summaries). 4: its ``demand`` and ``demand_forecast`` columns.
SCHEMA_VERSION: Final = 4

SCHEMA: Final = """
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
  updated_at DOUBLE PRECISION NOT NULL,
  inc TEXT NOT NULL DEFAULT '',
  last_sample_seq BIGINT NOT NULL DEFAULT -1,
  metric_gaps BIGINT NOT NULL DEFAULT 0,
  quarantined BIGINT NOT NULL DEFAULT 0,
  pending_site TEXT NOT NULL DEFAULT ''
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
  decided_at DOUBLE PRECISION, command_id TEXT NOT NULL DEFAULT '', updated_at DOUBLE PRECISION NOT NULL,
  request_id TEXT NOT NULL DEFAULT ''
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
CREATE TABLE IF NOT EXISTS incarnations (
  node TEXT NOT NULL, inc TEXT NOT NULL, base BIGINT NOT NULL, last_seq BIGINT NOT NULL,
  first_seen DOUBLE PRECISION NOT NULL, jump_seq BIGINT NOT NULL DEFAULT -1,
  jump_since DOUBLE PRECISION NOT NULL DEFAULT 0, PRIMARY KEY (node, inc)
);
CREATE TABLE IF NOT EXISTS notify_outbox (
  id {ID}, route TEXT NOT NULL, dedup_key TEXT NOT NULL, status TEXT NOT NULL, kind TEXT NOT NULL,
  node TEXT NOT NULL, severity TEXT NOT NULL, notice TEXT NOT NULL, state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, next_at DOUBLE PRECISION NOT NULL,
  claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
  created_at DOUBLE PRECISION NOT NULL, sent_at DOUBLE PRECISION,
  refreshed_at DOUBLE PRECISION NOT NULL DEFAULT 0, UNIQUE (route, dedup_key, status)
);
CREATE INDEX IF NOT EXISTS notify_outbox_due ON notify_outbox (state, next_at);
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY, csrf TEXT NOT NULL, actor TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  expires_at DOUBLE PRECISION NOT NULL
);
"""

#: The columns of ``nodes``, in table order (the ingest rewrites whole rows).
NODE_COLUMNS: Final = (
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
    "inc",
    "last_sample_seq",
    "metric_gaps",
    "quarantined",
    "pending_site",
)

#: The history tables, keyed by (node, seq): a node's highest stored seq is the highest of these.
HISTORY_TABLES: Final = ("presence", "metrics", "risk", "events", "actions", "acks", "lease_requests", "cost")

#: Version 1 -> 2: node incarnations (a node's seqs restart after its state dir was lost), metric
#: gaps, quarantined reports and a site change waiting for the operator.
_V2_COLUMNS: Final = (
    "inc TEXT NOT NULL DEFAULT ''",
    "last_sample_seq BIGINT NOT NULL DEFAULT -1",
    "metric_gaps BIGINT NOT NULL DEFAULT 0",
    "quarantined BIGINT NOT NULL DEFAULT 0",
    "pending_site TEXT NOT NULL DEFAULT ''",
)


def create_schema(db: Database, cur: Cursor) -> None:
    """Create missing tables and indexes; refuse a store whose schema is newer than this code."""
    ddl = SCHEMA.replace("{ID}", db.dialect.id_column) + ";" + cost.DDL
    if db.is_postgres:
        cur.execute("SELECT pg_advisory_xact_lock(4242001)")  # replicas starting together
    for stmt in ddl.split(";"):
        if stmt.strip():
            cur.execute(stmt)
    version = db.scalar(cur, "SELECT value FROM meta WHERE key = 'schema'")
    if version is not None and int(version) < SCHEMA_VERSION:
        if int(version) == 1:
            _migrate_to_2(db, cur)
        # 2 -> 3: the cost table, created above like every table (nothing to move)
        if int(version) == 3:  # 3 -> 4: the cost table's demand column (created above in older stores)
            for stmt in cost.MIGRATE_TO_4:
                db.execute(cur, stmt)
        db.execute(cur, "UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        return
    if version is None:
        db.execute(
            cur,
            "INSERT INTO meta (key, value) VALUES ('schema', ?) ON CONFLICT DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
    elif int(version) > SCHEMA_VERSION:
        raise StoreError(f"store schema version {version} is newer than this coordinator ({SCHEMA_VERSION})")


def _migrate_to_2(db: Database, cur: Cursor) -> None:
    """Add version 2's columns, and give every node its legacy incarnation (``""``, base 0, up to
    its highest stored seq), so its old reports keep their keys and the agents that send no
    incarnation go on exactly as before."""
    for column in _V2_COLUMNS:
        db.execute(cur, f"ALTER TABLE nodes ADD COLUMN {column}")
    # the node's own id of an approval request (the row's id is namespaced by node when needed)
    db.execute(cur, "ALTER TABLE approvals ADD COLUMN request_id TEXT NOT NULL DEFAULT ''")
    top: dict[str, int] = {}
    for table in HISTORY_TABLES:
        for row in db.rows(cur, f"SELECT node, MAX(seq) AS seq FROM {table} GROUP BY node"):  # noqa: S608
            if row["seq"] is not None:
                top[row["node"]] = max(top.get(row["node"], -1), int(row["seq"]))
    first = {row["node"]: row["first_seen"] for row in db.rows(cur, "SELECT node, first_seen FROM nodes")}
    db.execute_many(cur, "INSERT INTO incarnations (node, inc, base, last_seq, first_seen) "
                    "VALUES (?, '', 0, ?, ?) ON CONFLICT DO NOTHING",
                    [(node, top.get(node, -1), seen) for node, seen in sorted(first.items())])
