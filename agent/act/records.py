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
The record is also kept, in order with the ones after it (bounded: :data:`MAX_LATE_RECORDS`,
:data:`MAX_LATE_BYTES`, the oldest dropped and counted), and appended to the chain once the disk
takes it again (tried at the next record, and at least every :data:`LATE_RETRY_S` from the
engine's per-sample :meth:`Recorder.retry`), each with ``late``: ``{"wall": when it happened,
"error": why it was not written then}`` and, on the first after a drop, ``"lost_before": N``. So
a run carried out while the state dir was full is in the local audit once there is room (a
kill -9 before that loses what was held: the coordinator got it, unchained, at the time).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
from structlog.typing import FilteringBoundLogger

from agent.act.audit import AuditLog, canonical

#: Records held while the audit log cannot be written (a full or read-only state dir), and their
#: bytes: past either, the oldest are dropped (and counted in the next one written).
MAX_LATE_RECORDS: Final = 1000
MAX_LATE_BYTES: Final = 4 << 20
#: How often held records are tried again when no new record comes.
LATE_RETRY_S: Final = 5.0

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
    # verify.within: the samples checked, and the seconds from the first check to the verdict
    checks: int = 1
    watched_s: float = 0.0


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
        # (record, its size) not in the audit log yet, oldest first; see the module docstring
        self._late: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self._late_bytes = 0
        self._lost = 0  # held records dropped (over the bounds) since the last one written
        self._retry_at = 0.0  # monotonic: no write is tried before, while records are held

    @property
    def held(self) -> int:
        """Records waiting for the audit log to take writes again."""
        return len(self._late)

    def record(self, record: AuditRecord) -> None:
        """Append to the audit log and hand the record, with its chain position, to on_action."""
        built: dict[str, Any] = {"node": self.node, **msgspec.to_builtins(record, enc_hook=str)}
        entry: dict[str, Any] = {"record": built, "hash": None, "seq": None}
        if self._late and not self.retry():  # the held ones first: the chain keeps the order
            self._hold(built, "")
        else:
            try:
                entry = self.audit.append(built)
            except OSError as exc:  # logged by the audit log, once per streak of failures (a full disk)
                self._hold(built, exc.strerror or str(exc))
        try:
            self._on_action({**built, "audit_seq": entry["seq"], "audit_hash": entry["hash"]})
        except Exception:
            self.log.exception("on_action callback failed")

    def _hold(self, built: dict[str, Any], error: str) -> None:
        if not error and self._late:
            error = str(self._late[-1][0]["late"]["error"])
        late = {**built, "late": {"wall": round(time.time(), 6), "error": error}}
        size = len(canonical(late))
        self._late.append((late, size))
        self._late_bytes += size
        while len(self._late) > MAX_LATE_RECORDS or self._late_bytes > MAX_LATE_BYTES:
            _, dropped = self._late.popleft()
            self._late_bytes -= dropped
            self._lost += 1
        self._retry_at = time.monotonic() + LATE_RETRY_S

    def retry(self, *, force: bool = False) -> bool:
        """Append the held records, oldest first, unless the last try was under ``LATE_RETRY_S`` ago
        (``force``: now); True when none is held any more. Cheap when none is held (every sample)."""
        if not self._late:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        while self._late:
            late, size = self._late[0]
            if self._lost:
                late = {**late, "late": {**late["late"], "lost_before": self._lost}}
            try:
                self.audit.append(late)
            except OSError:
                self._retry_at = time.monotonic() + LATE_RETRY_S
                return False
            self._late.popleft()
            self._late_bytes -= size
            self._lost = 0
        self.log.info("audit records held while the state dir was full are in the chain again")
        return True

    def emit(self, event: dict[str, Any]) -> None:
        """An event for humans (escalation, breaker trip, approval request, notify)."""
        try:
            self._on_event({"node": self.node, "wall": time.time(), **event})
        except Exception:
            self.log.exception("on_event callback failed")
