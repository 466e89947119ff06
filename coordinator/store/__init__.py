"""Fleet state in SQLite (default) or PostgreSQL (``postgresql://`` URL; shared by replicas).

:class:`Store` is the one object the service and the web layer hold. Each of its methods hands
the work to one area of the store; read this file for what the store can do, and the area's
module for how:

========================  ===================================================================
:mod:`.database`          connections, dialects, the writer thread and reader pool, SQL helpers
:mod:`.schema`            the tables, and creating them
:mod:`.reports`           applying report batches exactly once, in order (the ingest path)
:mod:`.leases`            the fleet blast-radius policy: budgets, storms, fleet escalations
:mod:`.commands`          operator actions: commands, approvals, escalations
:mod:`.audit`             the audit trail
:mod:`.sessions`          dashboard sessions
:mod:`.retention`         pruning old history
:mod:`.queries`           the API's read queries
:mod:`.rows`              the typed rows the store returns, and their JSON decoding
========================  ===================================================================

Every area object shares one :class:`~coordinator.store.database.Database`; call the ``async``
methods from the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.wire.messages import Command
from coordinator.config import BudgetSection, StoreSection
from coordinator.errors import StoreError
from coordinator.model import BatchResult, Incoming, LeaseOutcome, LeaseRequest
from coordinator.store.audit import AuditTrail
from coordinator.store.commands import Commands
from coordinator.store.cost import CostQueries
from coordinator.store.database import Database, redact
from coordinator.store.demand import DemandQueries
from coordinator.store.leases import Leases, group_of
from coordinator.store.queries import NodeQuery, Queries
from coordinator.store.reports import Reports
from coordinator.store.retention import Retention
from coordinator.store.rows import (
    ApprovalRow,
    ChangeCursor,
    MetricSeries,
    NodeDetail,
    NodePage,
    RiskPoint,
    Session,
    TableName,
    TableRow,
    dumps,
)
from coordinator.store.schema import create_schema
from coordinator.store.sessions import Sessions


class Store:
    """The coordinator's store. Use :func:`open_store`; call the ``async`` methods from the loop."""

    def __init__(self, url: str, settings: StoreSection, budget: BudgetSection, *, replica: str = "") -> None:
        self.url = url
        self.settings = settings
        self.budget = budget
        self.replica = replica
        self.db = Database(url, writers=settings.writers)
        self.audit_trail = AuditTrail(self.db, replica)
        self.reports = Reports(self.db, budget)
        self.leases = Leases(self.db, budget, self.audit_trail)
        self.commands = Commands(self.db, self.audit_trail)
        self.sessions = Sessions(self.db)
        self.retention = Retention(self.db, settings, budget)
        self.queries = Queries(self.db, settings)
        self.cost = CostQueries(self.db)
        self.demand = DemandQueries(self.db)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create missing tables (and check the schema version)."""
        await self.db.write(lambda cur: create_schema(self.db, cur))

    async def close(self) -> None:
        await self.db.close()

    # ------------------------------------------------------------------ ingest and leases

    async def apply(self, batch: Sequence[Incoming]) -> BatchResult:
        return await self.reports.apply(batch)

    async def decide_leases(self, requests: Sequence[LeaseRequest]) -> LeaseOutcome:
        return await self.leases.decide_leases(requests)

    # ------------------------------------------------------------------ operator actions

    async def audit(
        self, actor: str, action: str, node: str = "", detail: dict[str, object] | None = None
    ) -> None:
        await self.audit_trail.record(actor, action, node, detail)

    async def record_commands(self, commands: Sequence[Command], actor: str) -> None:
        await self.commands.record_commands(commands, actor)

    async def get_approval(self, approval_id: str) -> ApprovalRow:
        return await self.commands.get_approval(approval_id)

    async def decide_approval(self, approval_id: str, approve: bool, actor: str, command: Command) -> None:
        await self.commands.decide_approval(approval_id, approve, actor, command)

    async def issue_command(
        self, command: Command, actor: str, audit_action: str, silence_until: float | None = None
    ) -> None:
        await self.commands.issue_command(command, actor, audit_action, silence_until)

    async def resolve_escalation(self, escalation_id: int, actor: str) -> None:
        await self.commands.resolve_escalation(escalation_id, actor)

    async def set_site(self, node: str, site: str, actor: str) -> str:
        return await self.commands.set_site(node, site, actor)

    async def node_site(self, node: str) -> str:
        return await self.commands.node_site(node)

    # ------------------------------------------------------------------ sessions

    async def create_session(self, session_hash: str, csrf: str, actor: str, ttl_s: float) -> None:
        await self.sessions.create_session(session_hash, csrf, actor, ttl_s)

    async def get_session(self, session_hash: str) -> Session | None:
        return await self.sessions.get_session(session_hash)

    async def delete_session(self, session_hash: str) -> None:
        await self.sessions.delete_session(session_hash)

    # ------------------------------------------------------------------ retention

    async def prune(self) -> dict[str, int]:
        return await self.retention.prune()

    # ------------------------------------------------------------------ queries

    async def list_nodes(self, q: NodeQuery) -> NodePage:
        return await self.queries.list_nodes(q)

    async def get_node(self, node: str) -> NodeDetail:
        return await self.queries.get_node(node)

    async def node_metrics(self, node: str, since: float, limit: int = 2000) -> MetricSeries:
        return await self.queries.node_metrics(node, since, limit)

    async def node_risk(self, node: str, since: float, limit: int = 2000) -> list[RiskPoint]:
        return await self.queries.node_risk(node, since, limit)

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
        return await self.queries.table(
            name, where=where, params=params, order=order, limit=limit, offset=offset
        )

    async def cursor(self) -> ChangeCursor:
        return await self.queries.cursor()

    async def changed_nodes(self, since: float, limit: int = 200) -> list[str]:
        return await self.queries.changed_nodes(since, limit)

    async def fleet_cost(self, *, days: int = 14, top: int = 10) -> dict[str, Any]:
        return await self.cost.fleet(days=days, top=top)

    async def fleet_demand(self, *, hours: int = 48, bucket_s: int = 3600) -> dict[str, Any]:
        return await self.demand.fleet(hours=hours, bucket_s=bucket_s)

    async def counts(self) -> dict[str, int]:
        return await self.queries.counts()


async def open_store(url: str, settings: StoreSection, budget: BudgetSection, *, replica: str = "") -> Store:
    """A :class:`Store` with its tables created; a :class:`StoreError` when that cannot be done."""
    store = Store(url, settings, budget, replica=replica)
    try:
        await store.open()
    except StoreError:
        await store.close()
        raise
    except Exception as exc:
        await store.close()
        raise StoreError(f"cannot initialise the store at {redact(url)}: {exc}") from exc
    return store


__all__ = ["NodeQuery", "Store", "dumps", "group_of", "open_store"]
