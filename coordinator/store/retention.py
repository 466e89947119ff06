"""Retention: the store's tables do not grow without bound.

Run every ``[store] prune_interval_s`` by the service. History is deleted by age (metrics, risk,
presence, lease requests) and metrics also by count per node; expired sessions are deleted; leases
past their expiry are marked released and approvals left pending for a day are marked expired.
The other tables (events, actions, acks, commands, approvals, escalations, incidents, leases, the
audit trail) are not pruned.
"""

from __future__ import annotations

import time

from coordinator.config import BudgetSection, StoreSection
from coordinator.store.database import Cursor, Database


class Retention:
    """The retention pass over every table."""

    def __init__(self, db: Database, settings: StoreSection, budget: BudgetSection) -> None:
        self.db = db
        self.settings = settings
        self.budget = budget

    async def prune(self) -> dict[str, int]:
        """Delete what is past retention; per table, how many rows went. Expire leases and approvals."""
        return await self.db.write(self._prune)

    def _prune(self, cur: Cursor) -> dict[str, int]:
        now = time.time()
        s = self.settings
        out: dict[str, int] = {}
        out["metrics"] = self.db.execute(
            cur, "DELETE FROM metrics WHERE last_wall < ?", (now - s.metrics_retention_s,)
        ).rowcount
        out["metrics_cap"] = self.db.execute(
            cur,
            "DELETE FROM metrics WHERE (node, seq) IN (SELECT node, seq FROM (SELECT node, seq, "
            "row_number() OVER (PARTITION BY node ORDER BY seq DESC) AS rn FROM metrics) AS ranked "
            "WHERE rn > ?)",
            (s.metrics_max_rows_per_node,),
        ).rowcount
        out["risk"] = self.db.execute(
            cur, "DELETE FROM risk WHERE ts < ?", (now - s.risk_retention_s,)
        ).rowcount
        # cost summaries are small (one a node an hour): kept at least the two weeks the cost page shows
        out["cost"] = self.db.execute(
            cur, "DELETE FROM cost WHERE end_ts < ?", (now - max(s.risk_retention_s, 15 * 86400),)
        ).rowcount
        out["presence"] = self.db.execute(
            cur, "DELETE FROM presence WHERE ts < ?", (now - s.risk_retention_s,)
        ).rowcount
        # the storm rule counts requests within storm_window_s: keep at least twice that
        out["lease_requests"] = self.db.execute(
            cur,
            "DELETE FROM lease_requests WHERE ts < ?",
            (now - max(self.budget.storm_window_s * 2, 3600),),
        ).rowcount
        out["sessions"] = self.db.execute(cur, "DELETE FROM sessions WHERE expires_at < ?", (now,)).rowcount
        self.db.execute(
            cur,
            "UPDATE leases SET released_at = expires_at, release_reason = 'expired' "
            "WHERE released_at IS NULL AND expires_at <= ?",
            (now,),
        )
        self.db.execute(
            cur,
            "UPDATE approvals SET state = 'expired', updated_at = ? WHERE state = 'pending' "
            "AND requested_at < ?",
            (now, now - 86400),
        )
        return out
