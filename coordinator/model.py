"""Plain data passed between the ingest loop, the store and the service.

Command and request-event names are :class:`agent.wire.CommandName` and
:class:`agent.wire.RequestEvent`, shared with the agent; rows the store returns are typed in
:mod:`coordinator.store.rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.wire import Message


def is_escalation(event_name: str) -> bool:
    """Events that page a human: ``escalation``, ``playbook.escalated``, ``escalation.*``."""
    return (
        event_name == "escalation"
        or event_name.startswith("escalation.")
        or event_name.endswith(".escalated")
    )


@dataclass(frozen=True, slots=True)
class Incoming:
    """One decoded report and when this replica received it."""

    message: Message
    kind: str
    received_at: float


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    node: str
    site: str
    seq: int
    request_id: str
    playbook: str
    run_id: str
    ttl_s: float | None
    ts: float


@dataclass(frozen=True, slots=True)
class StoreRejected:
    """A report the database would not take (a constraint, a value out of its range): left out of
    its batch, which is stored without it (:mod:`coordinator.store.reports`)."""

    node: str
    kind: str
    seq: int
    error: str
    reason: str = "store"  # the ingest's reject reason: "store", or "seq_jump" (quarantined)


@dataclass(slots=True)
class BatchResult:
    new: int = 0
    duplicates: int = 0
    lease_requests: list[LeaseRequest] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # commit time - message ts, for new messages
    rejected: list[StoreRejected] = field(default_factory=list)  # reports the store refused

    def add(self, other: BatchResult) -> None:
        """Add the result of a part of the batch to this one."""
        self.new += other.new
        self.duplicates += other.duplicates
        self.lease_requests += other.lease_requests
        self.lags += other.lags
        self.rejected += other.rejected


@dataclass(frozen=True, slots=True)
class LeaseDecision:
    request: LeaseRequest
    granted: bool
    reason: str
    lease_id: str = ""
    expires_at: float = 0.0
    group: str = ""
    escalation_id: int | None = None


@dataclass(frozen=True, slots=True)
class Revocation:
    lease_id: str
    node: str
    site: str
    playbook: str
    reason: str


@dataclass(slots=True)
class LeaseOutcome:
    decisions: list[LeaseDecision] = field(default_factory=list)
    revocations: list[Revocation] = field(default_factory=list)
    escalations_raised: list[int] = field(default_factory=list)
