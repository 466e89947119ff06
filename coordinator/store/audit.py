"""The audit trail: who did what to which node, from which replica.

Operator actions (logins, approvals, manual runs, silences, resolved escalations) and the
coordinator's own fleet escalations each add one ``audit`` row, in the same transaction as the
change they record, so the trail never claims a change that was rolled back.
"""

from __future__ import annotations

import time

from coordinator.store.database import Cursor, Database
from coordinator.store.rows import dumps


class AuditTrail:
    """Adds rows to ``audit``, stamped with this replica's id."""

    def __init__(self, db: Database, replica: str) -> None:
        self.db = db
        self.replica = replica

    def add(self, cur: Cursor, actor: str, action: str, node: str, detail: dict[str, object]) -> None:
        """One audit row, inside the caller's transaction."""
        self.db.execute(
            cur,
            "INSERT INTO audit (ts, actor, replica, action, node, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), actor, self.replica, action, node, dumps(detail)),
        )

    async def record(
        self, actor: str, action: str, node: str = "", detail: dict[str, object] | None = None
    ) -> None:
        """One audit row in a transaction of its own (an action that changes nothing else: a login)."""
        await self.db.write(lambda cur: self.add(cur, actor, action, node, detail or {}))
