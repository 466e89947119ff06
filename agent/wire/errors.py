"""Typed wire errors. All derive from :class:`agent.errors.WireError`, so a caller that only wants
"bad payload" catches that one class; a caller that wants to count reasons catches the subclasses."""

from __future__ import annotations

from agent.errors import WireError


class WireDecodeError(WireError):
    """Not a valid message: not msgpack, wrong shape, a field of the wrong type or out of range."""


class WireKindError(WireDecodeError):
    """A well-formed envelope whose ``kind`` this protocol version does not define."""


class WireVersionError(WireError):
    """The envelope's ``v`` is missing or a protocol version this build does not speak."""


class WireTooLarge(WireError):
    """The payload is larger than the configured maximum (checked before any decoding)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")


class WireTopicError(WireError):
    """A topic that is not ``heald/v1/<site>/<node>/<kind>`` or names an invalid site/node/kind."""


__all__ = ["WireDecodeError", "WireError", "WireKindError", "WireTooLarge", "WireTopicError",
           "WireVersionError"]
