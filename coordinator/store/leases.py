"""The fleet's blast-radius policy: which node may run a disruptive playbook step now.

A node asks for a lease (event ``lease_request``) before a disruptive step. Nodes are grouped by
site or by one label (``[budget] group_by``); within a group at most ``max_nodes`` nodes and
``max_percent`` of the group hold a lease at once. When more than ``storm_share`` of a group (and
at least ``storm_min_nodes`` nodes) ask to run the same playbook within ``storm_window_s``, that is
a storm: a fleet escalation is opened, the playbook's leases in the group are revoked, and every
further request is held until an operator resolves the escalation.

Each decision runs in its own write transaction under a per-group advisory lock (PostgreSQL), so
replicas deciding at the same time never overspend one budget.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import time
import zlib
from collections.abc import Sequence

from coordinator.config import BudgetSection
from coordinator.model import LeaseDecision, LeaseOutcome, LeaseRequest, Revocation
from coordinator.store.audit import AuditTrail
from coordinator.store.database import Cursor, Database
from coordinator.store.rows import dumps


def group_of(budget: BudgetSection, site: str, labels: dict[str, str]) -> str:
    """The blast-radius group of a node: ``site:<site>`` or ``<label>:<value>``."""
    if budget.group_by == "site":
        return f"site:{site}"
    label = budget.group_by.partition(":")[2]
    return f"{label}:{labels.get(label, '-')}"


def lock_key(group: str) -> int:
    """A signed 64-bit advisory-lock key for a budget group."""
    return zlib.crc32(group.encode()) + (1 << 32) * 4243


class Leases:
    """Decides lease requests against the budget and the storm rule."""

    def __init__(self, db: Database, budget: BudgetSection, audit: AuditTrail) -> None:
        self.db = db
        self.budget = budget
        self.audit = audit

    async def decide_leases(self, requests: Sequence[LeaseRequest]) -> LeaseOutcome:
        """Decide each request in ``(node, seq)`` order, each in its own transaction."""
        outcome = LeaseOutcome()
        for req in sorted(requests, key=lambda r: (r.node, r.seq)):
            await self.db.write(functools.partial(self._decide_lease, req=req, outcome=outcome))
        return outcome

    def _decide_lease(self, cur: Cursor, req: LeaseRequest, outcome: LeaseOutcome) -> None:
        """Held by an open fleet escalation, a new storm, already leased, over budget, or granted."""
        b = self.budget
        now = time.time()
        node = self.db.one(cur, "SELECT site, labels, silenced_until FROM nodes WHERE node = ?", (req.node,))
        labels = json.loads(node["labels"]) if node else {}
        grp = group_of(b, req.site, labels)
        if self.db.is_postgres:
            self.db.execute(cur, "SELECT pg_advisory_xact_lock(?)", (lock_key(grp),))
        if b.group_by == "site":
            size = int(self.db.scalar(cur, "SELECT count(*) FROM nodes WHERE site = ?", (req.site,)) or 0)
        else:
            key, _, value = grp.partition(":")
            size = int(
                self.db.scalar(
                    cur, "SELECT count(*) FROM node_labels WHERE key = ? AND value = ?", (key, value)
                )
                or 0
            )
        size = max(size, 1)
        self.db.execute(
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
            self.db.execute(
                cur,
                "UPDATE lease_requests SET decision = ?, reason = ? WHERE node = ? AND seq = ?",
                ("granted" if granted else "denied", reason, req.node, req.seq),
            )
            outcome.decisions.append(
                LeaseDecision(req, granted, reason, lease_id, expires_at, grp, escalation_id)
            )

        open_key = f"fleet:{grp}:{req.playbook}"
        held = self.db.one(cur, "SELECT id FROM escalations WHERE open_key = ?", (open_key,))
        if held is not None:
            decide(
                False,
                f"held: fleet escalation #{held['id']} is open for {req.playbook} in {grp}",
                escalation_id=int(held["id"]),
            )
            return
        distinct = int(
            self.db.scalar(
                cur,
                "SELECT count(DISTINCT node) FROM lease_requests WHERE grp = ? AND playbook = ? AND ts >= ?",
                (grp, req.playbook, now - b.storm_window_s),
            )
            or 0
        )
        if distinct >= b.storm_min_nodes and distinct > b.storm_share * size:
            nodes = [
                r["node"]
                for r in self.db.rows(
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
            esc_id = self.db.insert_new(
                cur,
                "INSERT INTO escalations (scope, node, grp, playbook, reason, ts, state, nodes, open_key, "
                "updated_at) VALUES ('fleet', '', ?, ?, ?, ?, 'open', ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                [(grp, req.playbook, reason, now, dumps(nodes), open_key, now)],
            )[0]
            if esc_id is not None:
                outcome.escalations_raised.append(int(esc_id))
                self.audit.add(
                    cur,
                    "coordinator",
                    "fleet_escalation",
                    "",
                    {"id": esc_id, "group": grp, "playbook": req.playbook, "nodes": distinct},
                )
                for lease in self.db.rows(
                    cur,
                    "SELECT id, node, site FROM leases WHERE grp = ? AND playbook = ? "
                    "AND released_at IS NULL AND expires_at > ?",
                    (grp, req.playbook, now),
                ):
                    self.db.execute(
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
                esc_id = self.db.scalar(cur, "SELECT id FROM escalations WHERE open_key = ?", (open_key,))
            decide(False, reason, escalation_id=None if esc_id is None else int(esc_id))
            return
        existing = self.db.one(
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
            self.db.scalar(
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
        self.db.execute(
            cur,
            "INSERT INTO leases (id, node, site, grp, playbook, request_id, granted_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (lease_id, req.node, req.site, grp, req.playbook, req.request_id, now, now + ttl),
        )
        decide(True, f"granted {active + 1} of {limit} in {grp}", lease_id, now + ttl)
