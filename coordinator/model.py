"""Plain data passed between the ingest loop, the store and the web layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.wire import Message
from agent.wire.messages import Command

#: Event names agents use for requests to the coordinator (see docs/coordinator.md).
LEASE_REQUEST = "lease_request"
LEASE_RELEASE = "lease_release"
APPROVAL_REQUEST = "approval_request"
#: Commands the coordinator sends.
LEASE_GRANT = "lease_grant"
LEASE_DENY = "lease_deny"
LEASE_REVOKE = "lease_revoke"
APPROVE = "approve"
DENY = "deny"
RUN_PLAYBOOK = "run_playbook"
SILENCE = "silence"


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


@dataclass(slots=True)
class BatchResult:
    new: int = 0
    duplicates: int = 0
    lease_requests: list[LeaseRequest] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # commit time - message ts, for new messages


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


@dataclass(frozen=True, slots=True)
class IssuedCommand:
    """A signed command recorded in the store, to publish."""

    command: Command
    actor: str


Row = dict[str, Any]
