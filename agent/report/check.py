"""The agent's side of wire validation: a message its coordinator would reject never leaves the node.

:meth:`Reporter.submit <agent.report.transport.Reporter.submit>` hands every stamped message to
:meth:`OutboundCheck.encode`, which encodes it and decodes the bytes back with the wire's own
validating decoder, the one the coordinator runs: what passes is a message the coordinator
accepts (its size is checked apart, against ``mqtt.max_payload_bytes``). The builders in
:mod:`agent.report.build` already keep every value inside the wire's bounds (NaN metrics become
null, strings are cut); this catches what they cannot know about: a message built elsewhere (the
control stage builds its lease events itself), a field added later, a bug.

A message that fails is not sent: the reporter drops and counts it (``dropped_invalid``). The
first failure of a streak is logged as an error, the ones after it at debug level, and the next
valid message of the same kind ends the streak with one info line saying how many were dropped.

Cost (the decode column of ``python3 bench/wire_codec.py``; measured on the 2-core development
VM, timeit, best of 7): encode and check of an event or an action about 3-4 µs (the encode
alone 0.5), of a risk message with 10 forecasts and 8 failure classes about 8 µs, of a metrics
batch of 10 samples x 150 metrics about 0.27 ms. Per sample that is nothing measurable: a risk
message goes out on change or once per ``metrics_interval_s``, events are rare, and the metrics
batch is once per ``metrics_interval_s`` (0.27 ms every 10 s by default).
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec

from agent import wire

#: What encoding a message can raise: an int msgpack cannot carry (OverflowError), a type it
#: does not know (TypeError), a string that is not valid Unicode (UnicodeEncodeError).
_ENCODE_FAILURES: Final = (msgspec.EncodeError, OverflowError, TypeError, ValueError)


class OutboundCheck:
    """Encode a message; None when the wire's decoder (the coordinator's) would reject it."""

    def __init__(self, logger: Any) -> None:
        self._log = logger
        self.rejected = 0  # messages refused since the reporter started
        self._streaks: dict[str, tuple[int, float]] = {}  # kind -> (failures, since); at most one per kind

    def encode(self, message: wire.Envelope) -> bytes | None:
        try:
            payload = wire.encode(message)
            wire.decode(payload, max_bytes=len(payload))
        except (wire.WireError, *_ENCODE_FAILURES) as exc:
            self._failed(message, exc)
            return None
        if self._streaks:
            self._ended(wire.kind_of(message))
        return payload

    def _failed(self, message: wire.Envelope, exc: BaseException) -> None:
        self.rejected += 1
        kind = wire.kind_of(message)
        failures, since = self._streaks.get(kind, (0, time.monotonic()))
        self._streaks[kind] = (failures + 1, since)
        fields = {"kind": kind, "seq": message.seq, "error": str(exc) or type(exc).__name__,
                  "error_type": type(exc).__name__}
        if failures == 0:
            self._log.error("report.message_invalid", **fields,
                            consequence="not sent: the coordinator would reject it")
        else:
            self._log.debug("report.message_invalid", **fields, streak=failures + 1)

    def _ended(self, kind: str) -> None:
        streak = self._streaks.pop(kind, None)
        if streak is not None:
            self._log.info("report.message_valid_again", kind=kind, dropped=streak[0],
                           for_s=round(time.monotonic() - streak[1], 1))
