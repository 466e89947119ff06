"""What the store hands to the service and the web layer: typed rows, and how they are decoded.

A row leaves the store in its API form: JSON columns decoded, 0/1 flags as booleans (see
:func:`api_row`). The :class:`~typing.TypedDict` classes here name the keys of each kind of row;
they are plain dicts at run time, so the JSON the API sends is exactly what the query selected, in
the query's column order.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal, NotRequired, TypedDict, TypeVar, cast

import msgspec

from agent.wire.messages import Args
from coordinator.store.database import DbRow

R = TypeVar("R")

_JSON_COLUMNS: Final = frozenset(
    {
        "labels",
        "capabilities",
        "collectors",
        "explanation",
        "failure",
        "forecasts",
        "result",
        "args",
        "samples",
        "nodes",
        "detail",
    }
)
_BOOL_COLUMNS: Final = frozenset({"online", "alert", "cold", "dry_run"})

_json_encoder = msgspec.json.Encoder()


def dumps(value: object) -> str:
    """Compact JSON text: JSON columns in the database, and the web layer's responses."""
    return _json_encoder.encode(value).decode()


def api_row(row: DbRow) -> dict[str, Any]:
    """DB row -> API object: JSON columns decoded, 0/1 columns as booleans."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in _JSON_COLUMNS and isinstance(v, str):
            out[k] = json.loads(v)
        elif k in _BOOL_COLUMNS and v is not None:
            out[k] = bool(v)
        else:
            out[k] = v
    return out


def api_rows(rows: list[DbRow], shape: type[R]) -> list[R]:
    """:func:`api_row` for each row, typed as ``shape``: the TypedDict whose keys the query selects.

    ``shape`` only names the type for the checker; nothing is checked at run time.
    """
    return [cast(R, api_row(r)) for r in rows]


# ---------------------------------------------------------------------------------- node state


class ContributionJson(TypedDict):
    """One feature's share of the anomaly score (:class:`agent.wire.Contribution`)."""

    feature: str
    share: float


class ForecastJson(TypedDict):
    """A resource forecast (:class:`agent.wire.Forecast`)."""

    resource: str
    eta_s: float | None
    confidence: float
    rate_per_s: float


class NodeSummary(TypedDict):
    """A node in the fleet list (``GET /api/nodes``); ``explanation`` holds the top three."""

    node: str
    site: str
    hostname: str
    agent_version: str
    model_version: str
    labels: dict[str, str]
    online: bool  # online and heard from within store.stale_after_s
    status_reason: str
    last_seen: float
    first_seen: float
    anomaly: float | None
    alert: bool
    cold: bool
    explanation: list[ContributionJson]
    open_incidents: int
    last_action: str
    silenced_until: float
    spool_pending: int
    dropped_metrics: int
    metric_gaps: int  # samples the node took that never reached the store (sample seqs skipped)
    pending_site: str  # a site the node claims and an operator has not accepted ("" none)
    # the fleet list only (a node's detail has its escalations): its open escalations, the newest's
    # reason and time
    open_escalations: NotRequired[int]
    escalation: NotRequired[str | None]
    escalation_ts: NotRequired[float | None]


class NodeState(NodeSummary):
    """A node's current state: the ``nodes`` row without its ordering columns."""

    capabilities: list[str]
    collectors: list[str]
    bdseq: int
    inc: str  # the incarnation its current state comes from
    quarantined: int  # reports held back: a seq far ahead of its incarnation's
    risk_ts: float | None
    failure: dict[str, float]
    forecasts: list[ForecastJson]
    updated_at: float


class FleetCounts(TypedDict):
    nodes: int
    online: int
    alert: int  # online nodes whose latest risk is an alert (an offline node's is stale)
    escalations: int  # open escalations, fleet-wide


class NodePage(TypedDict):
    """One page of the fleet list, the sites to filter by, and fleet-wide counts."""

    total: int
    offset: int
    limit: int
    items: list[NodeSummary]
    sites: list[str]
    fleet: FleetCounts


class RiskPoint(TypedDict):
    """One risk report (``GET /api/nodes/{node}/risk``)."""

    seq: int
    ts: float
    anomaly: float | None
    alert: bool
    cold: bool
    model_version: str
    explanation: list[ContributionJson]
    failure: dict[str, float]
    forecasts: list[ForecastJson]


class MetricSeries(TypedDict):
    """A node's samples since a time: each ``[wall, {metric: value}]``, oldest first."""

    node: str
    names: list[str]
    samples: list[list[Any]]


# ---------------------------------------------------------------------------------- history tables


class IncidentRow(TypedDict):
    id: int
    node: str
    opened_at: float
    closed_at: float | None
    reason: str


class EventRow(TypedDict):
    id: int
    node: str
    site: str
    seq: int
    ts: float
    wall: float
    name: str
    source: str
    labels: dict[str, str]
    value: float | None
    message: str


class ActionRow(TypedDict):
    id: int
    node: str
    site: str
    seq: int
    ts: float
    run_id: str
    playbook: str
    step: str
    action: str
    phase: str
    dry_run: bool
    outcome: str | None
    result: Args
    error: str
    duration_s: float | None


class CommandRow(TypedDict):
    """A signed command this coordinator sent, and the node's latest ack status."""

    id: str
    node: str
    site: str
    name: str
    args: Args
    issuer: str
    issued_at: float
    expires_at: float
    actor: str
    status: str
    status_message: str
    updated_at: float


class ApprovalRow(TypedDict):
    """A playbook step waiting for an operator: ``state`` pending, approved, denied or expired."""

    id: str
    node: str
    site: str
    seq: int
    run_id: str
    playbook: str
    action: str
    message: str
    requested_at: float
    state: str
    decided_by: str
    decided_at: float | None
    command_id: str
    updated_at: float
    request_id: str  # the node's own id of the request ("" before schema 2: the id itself)
    target: NotRequired[str]  # what the run would act on, from the request's labels ("" unknown)


class EscalationRow(TypedDict):
    """A node's escalation (``scope`` node) or a storm hold over a group (``scope`` fleet)."""

    id: int
    scope: str
    node: str
    grp: str
    playbook: str
    reason: str
    ts: float
    state: str
    nodes: list[str]
    resolved_by: str
    resolved_at: float | None
    open_key: str | None
    updated_at: float


class LeaseRow(TypedDict):
    id: str
    node: str
    site: str
    grp: str
    playbook: str
    request_id: str
    granted_at: float
    expires_at: float
    released_at: float | None
    release_reason: str


class AuditRow(TypedDict):
    id: int
    ts: float
    actor: str
    replica: str
    action: str
    node: str
    detail: dict[str, Any]


class NodeDetail(NodeState):
    """``GET /api/nodes/{node}``: the current state and the latest of each history, newest first."""

    incidents: list[IncidentRow]
    actions: list[ActionRow]
    events: list[EventRow]
    commands: list[CommandRow]
    approvals: list[ApprovalRow]
    escalations: list[EscalationRow]
    leases: list[LeaseRow]
    audit: list[AuditRow]


#: The history tables the API pages through with :meth:`coordinator.store.Store.table`.
TableName = Literal[
    "actions", "events", "audit", "approvals", "escalations", "leases", "commands", "incidents"
]
TableRow = ActionRow | EventRow | AuditRow | ApprovalRow | EscalationRow | LeaseRow | CommandRow | IncidentRow


# ---------------------------------------------------------------------------------- live stream, sessions


class ChangeCursor(TypedDict, total=False):
    """The newest change in each table; the live stream compares two to tell what changed."""

    nodes: float | None
    actions: int | None
    events: int | None
    approvals: float | None
    escalations: float | None
    commands: float | None
    audit: int | None


class Session(TypedDict):
    """A dashboard login: who, and the CSRF token its unsafe requests must carry."""

    csrf: str
    actor: str
    expires_at: float
