"""Commands off the broker: decode, check they are meant for this node, hand them on.

The report stage's MQTT session subscribes to :meth:`CommandReceiver.topics` on every connect
and passes each message it receives there to :meth:`CommandReceiver.on_message`. Everything
hostile stops here, counted and logged, without touching the connection: a payload that is not
msgpack, too large, of another kind or version, or a command addressed to another node or
arriving on another node's topic. What passes is not yet trusted: the handler (the
:class:`~agent.control.dispatcher.CommandDispatcher`) verifies its signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import structlog

from agent import wire
from agent.errors import WireError

log = structlog.get_logger("heald.control")

CommandHandler = Callable[[wire.Command], None]


@dataclass
class ReceiverCounters:
    commands: int = 0  # commands handed to the handler
    commands_rejected: int = 0  # malformed, oversized or mis-targeted command payloads

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class CommandReceiver:
    """The inbound side of the node's MQTT session (an :class:`agent.report.transport.Inbound`)."""

    def __init__(self, *, node: str, site: str, max_payload_bytes: int,
                 handler: CommandHandler | None = None) -> None:
        self.node = node
        self.site = site
        self.max_payload_bytes = max_payload_bytes
        self.handler = handler
        self.counters = ReceiverCounters()
        self._log = log.bind(node=node, site=site)

    def topics(self) -> list[str]:
        """This node's command topic, its site's and the fleet's."""
        return list(wire.command_topics(self.site, self.node))

    def on_message(self, topic: str, payload: object) -> None:
        self.receive(topic, payload)

    def receive(self, topic: str, payload: object) -> wire.Command | None:
        """Decode a command from the broker and hand it to the handler. Never raises for bad input."""
        try:
            if not isinstance(payload, bytes | bytearray):
                raise wire.WireDecodeError(f"command payload must be bytes, got {type(payload).__name__}")
            command = wire.decode_command(payload, max_bytes=self.max_payload_bytes)
            where = wire.parse_topic(topic)
            if not wire.command_matches(command, self.site, self.node):
                raise wire.WireDecodeError(f"command {command.id} targets {command.site}/{command.node}, "
                                           f"not this node")
            if wire.topic_for(command.site, command.node, "command") != topic:
                raise wire.WireDecodeError(f"command {command.id} for {command.site}/{command.node} "
                                           f"arrived on {where.site}/{where.node}")
        except WireError as exc:
            self.counters.commands_rejected += 1
            size = len(payload) if isinstance(payload, bytes | bytearray) else None
            self._log.warning("mqtt.command_rejected", topic=topic, error=str(exc),
                              error_type=type(exc).__name__, bytes=size)
            return None
        self.counters.commands += 1
        self._log.info("mqtt.command_received", command_id=command.id, name=command.name, topic=topic)
        if self.handler is not None:
            try:
                self.handler(command)
            except Exception:  # noqa: BLE001  (the handler is another part's code: contain, log, go on)
                self._log.exception("mqtt.command_handler_failed", command_id=command.id, name=command.name)
        return command
