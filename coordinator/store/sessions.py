"""Dashboard sessions, kept in the store so that any replica accepts a login made at another.

Only a hash of the session id is stored (the web layer hashes the cookie); expired sessions are
ignored here and deleted by the retention pass.
"""

from __future__ import annotations

import time
from typing import cast

from coordinator.store.database import Database
from coordinator.store.rows import Session


class Sessions:
    """Create, look up and delete dashboard sessions."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_session(self, session_hash: str, csrf: str, actor: str, ttl_s: float) -> None:
        """A session valid for ``ttl_s``; the caller keeps the id and stores only its hash."""
        now = time.time()
        await self.db.write(
            lambda cur: self.db.execute(
                cur,
                "INSERT INTO sessions (id, csrf, actor, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (session_hash, csrf, actor, now, now + ttl_s),
            )
        )

    async def get_session(self, session_hash: str) -> Session | None:
        """The unexpired session with this hash, or None."""
        row = await self.db.read(
            lambda cur: self.db.one(
                cur,
                "SELECT csrf, actor, expires_at FROM sessions WHERE id = ? AND expires_at > ?",
                (session_hash, time.time()),
            )
        )
        return None if row is None else cast(Session, row)

    async def delete_session(self, session_hash: str) -> None:
        await self.db.write(
            lambda cur: self.db.execute(cur, "DELETE FROM sessions WHERE id = ?", (session_hash,))
        )
