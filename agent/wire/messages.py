"""The heald wire messages (protocol version 1).

Every message is a msgpack map with the common envelope (``v``, ``kind``, ``node``, ``site``,
``seq``, ``ts``, ``mono``) plus the fields of its kind. ``kind`` is the tag of a msgspec tagged
union, so one :class:`msgspec.msgpack.Decoder` decodes and validates any message in one pass.

Compatibility rules (see docs/wire.md): within ``v == 1`` fields are only ever *added*, with a
default; decoders ignore fields they do not know. Removing, renaming or retyping a field, or
changing what it means, is a new protocol version.

This module imports only the stdlib and msgspec: the coordinator imports it without the agent.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from agent.wire.control import AckStatus

PROTOCOL_VERSION: Final = 1
#: Versions this build can decode.
SUPPORTED_VERSIONS: Final = frozenset({PROTOCOL_VERSION})

#: Node and site ids: they are MQTT topic levels, so no ``/``, ``+``, ``#`` or leading ``_``.
ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
#: A command target: a node/site id or ``*`` (every node / every site).
TARGET_PATTERN: Final = r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,62})$"
ANY_TARGET: Final = "*"

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Target = Annotated[str, msgspec.Meta(pattern=TARGET_PATTERN)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Scalar = str | int | float | bool | None
#: Arguments and results: flat maps of scalars or lists of scalars (no free-form nesting).
Args = dict[str, Scalar | list[Scalar]]


class Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", omit_defaults=True):
    """Fields every message carries. ``kind`` is written by msgspec from the subclass tag."""

    v: int  # protocol version; always written, never defaulted on decode
    node: Id  # the sending node (for commands: the target, see Command)
    site: Id
    seq: Seq  # per-sender sequence number: strictly increasing, never reused (dedupe key with node)
    ts: float  # wall clock (time.time()) when the message was created; kept on replay
    mono: float | None = None  # sender's time.monotonic() at creation, where meaningful


class Birth(Envelope, tag="birth", kw_only=True, frozen=True, omit_defaults=True):
    """Who this node is; published (QoS 1, retained) on every connect."""

    bdseq: Count  # birth/death sequence: +1 per connect; the matching will carries the same value
    agent_version: Text
    model_version: Text = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    collectors: list[str] = msgspec.field(default_factory=list)
    capabilities: list[str] = msgspec.field(default_factory=list)
    hostname: Text = ""
    boot_ts: float | None = None  # when the agent process started (wall clock)


class Status(Envelope, tag="status", kw_only=True, frozen=True, omit_defaults=True):
    """Online/offline. Retained. ``offline`` is also the MQTT last will (same ``bdseq``)."""

    state: Literal["online", "offline"]
    bdseq: Count
    reason: Text = ""
    spool_pending: Count = 0  # records waiting in the node's spool when this was sent
    dropped_metrics: Count = 0  # metrics records dropped by the spool (quota, full disk), since agent start
    dropped_other: Count = 0  # non-metrics records dropped (state dir full or unwritable), since agent start


class MetricSample(msgspec.Struct, frozen=True, kw_only=True):
    seq: Seq  # the sample's own sequence number (agent.collect.sample.Sample.seq)
    wall: float
    mono: float
    metrics: dict[str, float | None]


class Metrics(Envelope, tag="metrics", kw_only=True, frozen=True, omit_defaults=True):
    """A batch of samples' metric dicts (oldest first). QoS 0."""

    samples: list[MetricSample]


class Contribution(msgspec.Struct, frozen=True):
    feature: str
    share: float


class Forecast(msgspec.Struct, frozen=True, kw_only=True):
    resource: str
    eta_s: float | None
    confidence: Probability
    rate_per_s: float


class Risk(Envelope, tag="risk", kw_only=True, frozen=True, omit_defaults=True):
    """Failure risk from the on-device model, sent when it changes. QoS 1."""

    sample_seq: Seq
    anomaly: float | None  # 1.0 is the alert threshold; None while cold
    alert: bool
    cold: bool
    model_version: Text
    explanation: list[Contribution] = msgspec.field(default_factory=list)
    failure: dict[str, Probability] = msgspec.field(default_factory=dict)
    forecasts: list[Forecast] = msgspec.field(default_factory=list)


class Event(Envelope, tag="event", kw_only=True, frozen=True, omit_defaults=True):
    """Something that happened (an XID, an OOM kill, a link down, the spool dropping metrics). QoS 1."""

    name: Name  # event type, e.g. "gpu.xid", "report.spool_dropped"
    source: Text
    wall: float  # when it happened (ts is when the message was built)
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    value: float | None = None
    message: Text = ""


class Action(Envelope, tag="action", kw_only=True, frozen=True, omit_defaults=True):
    """A remediation step starting or finishing. QoS 1."""

    phase: Literal["started", "finished"]
    run_id: Name
    playbook: Name
    step: Text
    action: Text
    dry_run: bool
    outcome: Literal["ok", "failed", "skipped", "timeout", "refused"] | None = None  # set when finished
    result: Args = msgspec.field(default_factory=dict)
    error: Text = ""
    duration_s: float | None = None


class Command(Envelope, tag="command", kw_only=True, frozen=True, omit_defaults=True):
    """A command from the coordinator. ``node``/``site`` are the *target* (``*`` = all).

    The signature covers the other fields; it is verified by the act stage, not here.
    """

    node: Target
    site: Target
    id: Name
    issuer: Text = ""
    issued_at: float
    expires_at: float
    nonce: Annotated[bytes, msgspec.Meta(max_length=64)]
    name: Name
    args: Args = msgspec.field(default_factory=dict)
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)] = b""


class CommandAck(Envelope, tag="command_ack", kw_only=True, frozen=True, omit_defaults=True):
    """A node's answer to a command. QoS 1."""

    command_id: Name
    status: AckStatus
    message: Text = ""
    result: Args = msgspec.field(default_factory=dict)


Message = Birth | Status | Metrics | Risk | Event | Action | Command | CommandAck

MESSAGE_TYPES: Final[tuple[type[Envelope], ...]] = (
    Birth, Status, Metrics, Risk, Event, Action, Command, CommandAck,
)
#: kind tag -> class
KINDS: Final[dict[str, type[Envelope]]] = {str(cls.__struct_config__.tag): cls for cls in MESSAGE_TYPES}


def kind_of(message: Envelope | type[Envelope]) -> str:
    """The ``kind`` tag of a message (instance or class)."""
    cls = message if isinstance(message, type) else type(message)
    return str(cls.__struct_config__.tag)
