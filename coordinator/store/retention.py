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
from coordinator.store.database import Cursor, Database, iter_chunks


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
        nodes = [r["node"] for r in self.db.rows(cur, "SELECT node FROM nodes ORDER BY node")]
        out["metrics"] = self._by_node(cur, "DELETE FROM metrics WHERE node = ? AND last_wall < ?",
                                       nodes, now - s.metrics_retention_s)
        out["metrics_cap"] = self._cap_metrics(cur, s.metrics_max_rows_per_node)
        out["risk"] = self._by_node(cur, "DELETE FROM risk WHERE node = ? AND ts < ?",
                                    nodes, now - s.risk_retention_s)
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

    def _by_node(self, cur: Cursor, sql: str, nodes: list[str], before: float) -> int:
        """``sql`` (``DELETE ... WHERE node = ? AND <time> < ?``) for every node: each a range of
        the table's ``(node, time)`` index, where one ``DELETE ... WHERE <time> < ?`` would scan
        the whole table on the one writer every pass while ingest waits (every history row has
        its node's row: nodes are never deleted). The rows deleted."""
        total = 0
        for chunk in iter_chunks(nodes, 1000):
            self.db.execute_many(cur, sql, [(node, before) for node in chunk])
            total += max(0, cur.rowcount)
        return total

    def _cap_metrics(self, cur: Cursor, cap: int) -> int:
        """Keep each node's newest ``cap`` metrics rows. The nodes over the cap are found by one
        pass over the ``(node, seq)`` key in its order (no sort); only theirs are deleted, each
        below the seq of its ``cap + 1``-th newest row (a window over the whole table sorted every
        row on every pass: ~1 s of stalled ingest at 1.2M rows on SQLite)."""
        over = [r["node"] for r in self.db.rows(
            cur, "SELECT node FROM metrics GROUP BY node HAVING count(*) > ? ORDER BY node", (cap,))]
        total = 0
        for node in over:
            total += max(0, self.db.execute(
                cur,
                "DELETE FROM metrics WHERE node = ? AND seq <= (SELECT seq FROM metrics WHERE node = ? "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (node, node, cap),
            ).rowcount)
        return total
