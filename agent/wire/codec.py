"""Encode and decode wire messages (msgpack via msgspec), and the per-kind delivery policy.

:func:`decode` is the only way bytes from the network become messages. It checks the size
*before* touching the payload, decodes and validates in one msgspec pass, and turns every
failure into a :class:`~agent.errors.WireError` subclass; nothing else escapes it.
"""

from __future__ import annotations

import re
from typing import Any, Final, NamedTuple

import msgspec

from agent.wire.errors import WireDecodeError, WireKindError, WireTooLarge, WireVersionError
from agent.wire.messages import KINDS, MAX_FLOAT, SUPPORTED_VERSIONS, Command, Envelope, Message, kind_of

#: What msgspec may raise on hostile input: its own errors, invalid UTF-8 in a key or tag
#: (UnicodeDecodeError, a ValueError), and nesting deeper than the interpreter allows.
_DECODE_FAILURES: Final = (msgspec.DecodeError, ValueError, RecursionError)

#: Default ceiling for a payload (the agent's ``mqtt.max_payload_bytes`` default).
DEFAULT_MAX_BYTES: Final = 256 * 1024


class Delivery(NamedTuple):
    qos: int
    retain: bool


#: How each kind is published. Metrics are periodic and superseded by the next batch: QoS 0.
DELIVERY: Final[dict[str, Delivery]] = {
    "birth": Delivery(1, True),
    "status": Delivery(1, True),
    "metrics": Delivery(0, False),
    "risk": Delivery(1, False),
    "event": Delivery(1, False),
    "action": Delivery(1, False),
    "command": Delivery(1, False),
    "command_ack": Delivery(1, False),
    "cost": Delivery(1, False),
}

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
_json_encoder = msgspec.json.Encoder()
_json_decoder: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)


class _Head(msgspec.Struct):
    """Just enough of an envelope to say why a full decode failed."""

    v: Any = None
    kind: Any = None


_head_decoder = msgspec.msgpack.Decoder(_Head)


def encode(message: Envelope) -> bytes:
    """Encode one message to msgpack."""
    return _encoder.encode(message)


def delivery_for(message: Envelope | str) -> Delivery:
    return DELIVERY[message if isinstance(message, str) else kind_of(message)]


def _check_version(v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise WireVersionError(f"envelope field 'v' must be an integer protocol version, got {v!r}")
    if v not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(s) for s in sorted(SUPPORTED_VERSIONS))
        raise WireVersionError(f"protocol version {v} is not supported (this build speaks {supported})")


#: msgspec's words for a ``Finite`` field's bound, which is what NaN and the infinities fail.
_NOT_FINITE: Final = re.compile(r"Expected `float` [<>]= -?" + re.escape(repr(MAX_FLOAT)))


def _describe(exc: msgspec.ValidationError) -> str:
    return _NOT_FINITE.sub("Expected a finite `float` (not NaN or infinite)", str(exc))


def _explain(data: bytes | bytearray | memoryview, exc: msgspec.ValidationError) -> WireDecodeError:
    """Turn a validation failure into the most specific error: version first, then kind."""
    try:
        head = _head_decoder.decode(data)
    except _DECODE_FAILURES:
        return WireDecodeError(f"invalid message: {_describe(exc)}")
    _check_version(head.v)  # raises WireVersionError
    if not isinstance(head.kind, str) or head.kind not in KINDS:
        return WireKindError(f"unknown message kind {head.kind!r} (known: {', '.join(sorted(KINDS))})")
    return WireDecodeError(f"invalid {head.kind} message: {_describe(exc)}")


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Decode and validate one message.

    Raises :class:`WireTooLarge` (checked before decoding), :class:`WireVersionError`,
    :class:`WireKindError` or :class:`WireDecodeError` — all :class:`~agent.errors.WireError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireDecodeError(f"payload must be bytes, got {type(data).__name__}")
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size > max_bytes:
        raise WireTooLarge(size, max_bytes)
    try:
        message = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _explain(data, exc) from None
    except _DECODE_FAILURES as exc:
        raise WireDecodeError(f"malformed msgpack: {exc}") from None
    _check_version(message.v)
    return message


def decode_command(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Command:
    """Decode a payload that must be a :class:`Command`."""
    message = decode(data, max_bytes=max_bytes)
    if not isinstance(message, Command):
        raise WireKindError(f"expected a command, got a {kind_of(message)} message")
    return message


def encode_json(message: Envelope) -> bytes:
    """JSON form of a message (debugging, the dashboard, the codec benchmark). Bytes become base64."""
    return _json_encoder.encode(message)


def decode_json(data: bytes | str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """JSON counterpart of :func:`decode`, with the same error contract."""
    if len(data) > max_bytes:
        raise WireTooLarge(len(data), max_bytes)
    try:
        message = _json_decoder.decode(data)
    except _DECODE_FAILURES as exc:
        raise WireDecodeError(f"invalid JSON message: {exc}") from None
    _check_version(message.v)
    return message
