"""The engine's two outputs: audit records (hash-chained, then ``on_action``) and events for humans.

Both callbacks must be quick and must not raise; if one does anyway, the failure is logged and
the engine goes on, because a broken consumer must not stop remediation. An audit append that
fails (disk full) is logged and the record is still handed on, unchained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from structlog.typing import FilteringBoundLogger

from agent.act.audit import AuditLog

Callback = Callable[[dict[str, Any]], None]


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

    def record(self, record: dict[str, Any]) -> None:
        """Append to the audit log and hand the record, with its chain position, to on_action."""
        record = {"node": self.node, **record}
        try:
            entry = self.audit.append(record)
        except OSError:
            self.log.exception("audit append failed", record=record)
            entry = {"record": record, "hash": None, "seq": None}
        try:
            self._on_action({**record, "audit_seq": entry["seq"], "audit_hash": entry["hash"]})
        except Exception:
            self.log.exception("on_action callback failed")

    def emit(self, event: dict[str, Any]) -> None:
        """An event for humans (escalation, breaker trip, approval request, notify)."""
        try:
            self._on_event({"node": self.node, "wall": time.time(), **event})
        except Exception:
            self.log.exception("on_event callback failed")
