"""The engine's two outputs: typed audit records (hash-chained, then ``on_action``) and events for
humans (``on_event``).

Every decision and every step of a run is one :class:`AuditRecord` subclass; its tag is the
record's ``type`` in the audit log and in the action messages the coordinator receives. Those
consumers read dicts (the audit log is JSON), so the tags are the contract: :data:`RECORD_TYPES`
lists every one the engine writes, and nothing else may be expected.

Both callbacks must be quick and must not raise; if one does anyway, the failure is logged and
the engine goes on, because a broken consumer must not stop remediation. An audit append that
fails (disk full) is logged (once per streak, by :class:`agent.act.audit.AuditLog`) and the record
is still handed on, unchained (``audit_seq``/``audit_hash`` None); the chain on disk stays valid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
from structlog.typing import FilteringBoundLogger

from agent.act.audit import AuditLog

Callback = Callable[[dict[str, Any]], None]
Inputs = dict[str, Any]  # metric values, counts and lists that made a trigger hold


class AuditRecord(msgspec.Struct, kw_only=True, tag_field="type"):
    playbook: str


class _Model(AuditRecord, kw_only=True):
    """Decisions carry the model's view at the time."""

    model_version: str | None = None
    anomaly: float | None = None
    cold: bool | None = None


class Held(_Model, tag="held", kw_only=True):
    target: str
    reason: str
    bindings: dict[str, str]
    inputs: Inputs


class ApprovalRequested(_Model, tag="approval.requested", kw_only=True):
    target: str
    request_id: str
    bindings: dict[str, str]
    inputs: Inputs


class ApprovalDenied(AuditRecord, tag="approval.denied", kw_only=True):
    target: str
    request_id: str
    by: str
    bindings: dict[str, str]


class BreakerReset(AuditRecord, tag="breaker.reset", kw_only=True):
    target: str
    by: str


class Control(AuditRecord, tag="control", kw_only=True):
    """An operator's command, from the coordinator or from ``heald`` on the node itself."""

    command: str  # run, approve, deny, silence, unsilence, breaker_reset, ...
    origin: str  # coordinator | local
    by: str  # the operator (coordinator) or the local user
    uid: int | None  # the local caller's uid (SO_PEERCRED); None from the coordinator
    command_id: str
    status: str  # done | failed | rejected
    message: str
    args: dict[str, Any]


class RunStart(_Model, tag="run.start", kw_only=True):
    run_id: str
    target: str
    trigger: str
    approved_by: str
    dry_run: bool
    bindings: dict[str, str]
    inputs: Inputs
    # [playbooks] force_mode (`heald run --dry-run` sets it) when it overrode the playbook's own mode.
    mode_forced: str = ""


class RunRecovered(AuditRecord, tag="run.recovered", kw_only=True):
    run_id: str
    target: str
    completed_steps: list[int]
    interrupted_step: int | None


class Step(AuditRecord, tag="step", kw_only=True):
    run_id: str
    target: str
    step: int
    step_name: str
    action: str
    status: str  # done | failed | interrupted | dry-run
    dry_run: bool
    ok: bool
    changed: bool
    detail: str
    duration_s: float
    data: dict[str, Any]


class Verify(AuditRecord, tag="verify", kw_only=True):
    run_id: str
    target: str
    step: int
    ok: bool
    reason: str
    inputs: Inputs


class Escalate(AuditRecord, tag="escalate", kw_only=True):
    run_id: str
    target: str
    kind: str
    severity: str
    message: str
    labels: dict[str, str]
    inputs: Inputs
    tried: list[str]  # what each step did, in order


class RunHeld(AuditRecord, tag="run.held", kw_only=True):
    run_id: str
    target: str
    reason: str


class RunError(AuditRecord, tag="run.error", kw_only=True):
    run_id: str
    target: str
    error: str


class RunEnd(AuditRecord, tag="run.end", kw_only=True):
    run_id: str
    target: str
    outcome: str  # succeeded | escalated | dry-run | held | error | denied
    dry_run: bool
    consecutive_failures: int
    duration_s: float | None
    journal_complete: bool = True  # False: some journal records were only in memory (full disk)


class RunAbandoned(AuditRecord, tag="run.abandoned", kw_only=True):
    run_id: str
    reason: str


class BreakerOpen(AuditRecord, tag="breaker.open", kw_only=True):
    run_id: str
    target: str
    consecutive_failures: int


RECORDS: Final[tuple[type[AuditRecord], ...]] = (
    Held, ApprovalRequested, ApprovalDenied, BreakerReset, Control, RunStart, RunRecovered, Step, Verify,
    Escalate, RunHeld, RunError, RunEnd, RunAbandoned, BreakerOpen,
)
#: Every ``type`` the engine writes.
RECORD_TYPES: Final = frozenset(str(cls.__struct_config__.tag) for cls in RECORDS)
#: The records that end a run (the run's outcome is final).
ENDS_A_RUN: Final = frozenset({"run.end", "run.abandoned"})


class Recorder:
    def __init__(
        self,
        node: str,
        audit: AuditLog,
        log: FilteringBoundLogger,
        on_action: Callback | None = None,
        on_event: Callback | None = None,
    ) -> None:
        self.node = node
        self.audit = audit
        self.log = log
        self._on_action = on_action or (lambda _r: None)
        self._on_event = on_event or (lambda _e: None)

    def record(self, record: AuditRecord) -> None:
        """Append to the audit log and hand the record, with its chain position, to on_action."""
        built: dict[str, Any] = {"node": self.node, **msgspec.to_builtins(record, enc_hook=str)}
        try:
            entry = self.audit.append(built)
        except OSError:  # logged by the audit log, once per streak of failures (a full disk)
            entry = {"record": built, "hash": None, "seq": None}
        try:
            self._on_action({**built, "audit_seq": entry["seq"], "audit_hash": entry["hash"]})
        except Exception:
            self.log.exception("on_action callback failed")

    def emit(self, event: dict[str, Any]) -> None:
        """An event for humans (escalation, breaker trip, approval request, notify)."""
        try:
            self._on_event({"node": self.node, "wall": time.time(), **event})
        except Exception:
            self.log.exception("on_event callback failed")
