"""What the control stage needs of the report stage: send a message, know whether we are connected."""

from __future__ import annotations

from typing import Protocol

from agent import wire


class Outbox(Protocol):
    """The node's way to the coordinator (:class:`agent.report.transport.Reporter`)."""

    @property
    def connected(self) -> bool:
        """Whether the broker session is up right now."""
        ...

    def submit(self, message: wire.Envelope) -> bool:
        """Queue one message for delivery; never blocks. False when it was dropped."""
        ...
