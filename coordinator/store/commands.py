"""Operator actions in the store: commands sent, approvals decided, escalations resolved.

Each action is one write transaction that checks the object's state, changes it, records the
signed command it sends (if any) and adds an audit row. The state checks are conditional
``UPDATE ... WHERE state = ...`` statements, so when two replicas (or two operators) act on one
approval or escalation at once, exactly one succeeds and the other gets :class:`Conflict`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import cast

from agent.wire.messages import Command
from coordinator.errors import Conflict, NotFound
from coordinator.store.audit import AuditTrail
from coordinator.store.database import Cursor, Database
from coordinator.store.rows import ApprovalRow, api_row, dumps


class Commands:
    """Commands, approvals and escalations: what operators (and the lease policy) change."""

    def __init__(self, db: Database, audit: AuditTrail) -> None:
        self.db = db
        self.audit = audit

    def _record_command(self, cur: Cursor, cmd: Command, actor: str, status: str = "sent") -> None:
        """The signed command as sent, so its acks can update its status."""
        self.db.execute(
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
        """Commands the coordinator decided itself (lease answers, revocations), in one transaction."""

        def run(cur: Cursor) -> None:
            for cmd in commands:
                self._record_command(cur, cmd, actor)

        await self.db.write(run)

    async def get_approval(self, approval_id: str) -> ApprovalRow:
        """An approval in any state (the service reads the request it answers from it)."""
        row = await self.db.read(
            lambda cur: self.db.one(cur, "SELECT * FROM approvals WHERE id = ?", (approval_id,))
        )
        if row is None:
            raise NotFound(f"no approval {approval_id!r}")
        return cast(ApprovalRow, api_row(row))

    async def decide_approval(self, approval_id: str, approve: bool, actor: str, command: Command) -> None:
        """Mark a pending approval decided and record its signed command — once, across replicas."""
        state = "approved" if approve else "denied"

        def run(cur: Cursor) -> None:
            now = time.time()
            self.db.execute(
                cur,
                "UPDATE approvals SET state = ?, decided_by = ?, decided_at = ?, command_id = ?, "
                "updated_at = ? WHERE id = ? AND state = 'pending'",
                (state, actor, now, command.id, now, approval_id),
            )
            if cur.rowcount != 1:
                row = self.db.one(cur, "SELECT state FROM approvals WHERE id = ?", (approval_id,))
                if row is None:
                    raise NotFound(f"no approval {approval_id!r}")
                raise Conflict(f"approval {approval_id!r} is already {row['state']}")
            self._record_command(cur, command, actor)
            self.audit.add(
                cur,
                actor,
                state,
                command.node,
                {"approval": approval_id, "command": command.id, "args": dict(command.args)},
            )

        await self.db.write(run)

    async def issue_command(
        self, command: Command, actor: str, audit_action: str, silence_until: float | None = None
    ) -> None:
        """Record an operator's command to a known node, audited; ``silence_until`` (if given) is the
        node's new ``silenced_until``: a silence's end, or 0 when the silence is lifted."""

        def run(cur: Cursor) -> None:
            if self.db.one(cur, "SELECT node FROM nodes WHERE node = ?", (command.node,)) is None:
                raise NotFound(f"no node {command.node!r}")
            if silence_until is not None:
                self.db.execute(
                    cur,
                    "UPDATE nodes SET silenced_until = ?, updated_at = ? WHERE node = ?",
                    (silence_until, time.time(), command.node),
                )
            self._record_command(cur, command, actor)
            self.audit.add(
                cur,
                actor,
                audit_action,
                command.node,
                {"command": command.id, "name": command.name, "args": dict(command.args)},
            )

        await self.db.write(run)

    async def resolve_escalation(self, escalation_id: int, actor: str) -> None:
        """Close an open escalation (a fleet one lifts its storm hold), audited; once, across replicas.

        A fleet escalation's key is freed (a new storm may open another); a node escalation keeps
        its run's key, so a late repeat of the same run's escalation does not open it again
        (:func:`coordinator.store.reports.node_escalation_key`).
        """

        def run(cur: Cursor) -> None:
            now = time.time()
            self.db.execute(
                cur,
                "UPDATE escalations SET state = 'resolved', resolved_by = ?, resolved_at = ?, "
                "open_key = CASE WHEN scope = 'fleet' THEN NULL ELSE open_key END, updated_at = ? "
                "WHERE id = ? AND state = 'open'",
                (actor, now, now, escalation_id),
            )
            if cur.rowcount != 1:
                if self.db.one(cur, "SELECT id FROM escalations WHERE id = ?", (escalation_id,)) is None:
                    raise NotFound(f"no escalation {escalation_id}")
                raise Conflict(f"escalation {escalation_id} is already resolved")
            self.audit.add(cur, actor, "resolve_escalation", "", {"escalation": escalation_id})

        await self.db.write(run)

    async def set_site(self, node: str, site: str, actor: str) -> str:
        """An operator moves a node to ``site`` (the site it claims, usually): nodes never move
        themselves (a claim waits in ``pending_site``). Returns the site it was in; audited."""

        def run(cur: Cursor) -> str:
            row = self.db.one(cur, "SELECT site, pending_site FROM nodes WHERE node = ?", (node,))
            if row is None:
                raise NotFound(f"no node {node!r}")
            self.db.execute(cur, "UPDATE nodes SET site = ?, pending_site = CASE WHEN pending_site = ? "
                            "THEN '' ELSE pending_site END, updated_at = ? WHERE node = ?",
                            (site, site, time.time(), node))
            self.audit.add(cur, actor, "set_site", node, {"from": row["site"], "to": site})
            return str(row["site"])

        return await self.db.write(run)

    async def node_site(self, node: str) -> str:
        """The site of a known node (a command's target needs it)."""
        row = await self.db.read(
            lambda cur: self.db.one(cur, "SELECT site FROM nodes WHERE node = ?", (node,))
        )
        if row is None:
            raise NotFound(f"no node {node!r}")
        return str(row["site"])
