"""The heald wire messages (protocol version 1).

Every message is a msgpack map with the common envelope (``v``, ``kind``, ``node``, ``site``,
``seq``, ``ts``, ``mono``) plus the fields of its kind. ``kind`` is the tag of a msgspec tagged
union, so one :class:`msgspec.msgpack.Decoder` decodes and validates any message in one pass.

Compatibility rules (see docs/wire.md): within ``v == 1`` fields are only ever *added*, with a
default; decoders ignore fields they do not know. Removing, renaming or retyping a field, or
changing what it means, is a new protocol version.

Every field is bounded (docs/wire.md, "Bounds"): every float finite (NaN and infinities are
rejected by the ``ge``/``le`` constraints) and timestamps within :data:`MAX_WALL`, every string,
list and map of a bounded size. One sender's garbage is rejected here, by the decoder, and
never reaches the coordinator's store; the agent checks its own messages with the same decoder
before sending (:mod:`agent.report.check`).

This module imports only the stdlib and msgspec: the coordinator imports it without the agent.
"""

from __future__ import annotations

import sys
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

# --- bounds (docs/wire.md, "Bounds"): generous, far above what an agent sends ------------------
#: The largest finite float: a ``Finite`` field rejects NaN and the infinities, nothing else.
MAX_FLOAT: Final = sys.float_info.max
#: Wall-clock timestamps (seconds since the epoch): 0 .. 1e11, the year 5138.
MAX_WALL: Final = 1e11
#: Sequence numbers and counters fit a signed 64-bit integer (the store's BIGINT).
MAX_INT: Final = 2**63 - 1
MAX_TEXT: Final = 4096  # characters of a free text (messages, errors, label values)
MAX_NAME: Final = 256  # characters of a name (event name, run id, playbook, command id)
MAX_KEY: Final = 1024  # characters of a key or list item: metric keys, label keys, features, ...
MAX_LABELS: Final = 256  # entries of a label map (birth, event)
MAX_ITEMS: Final = 1024  # items of a list of names, contributions or forecasts; failure classes
MAX_ARGS: Final = 1024  # entries of an Args map, and items of a list inside it
MAX_METRICS: Final = 16384  # metrics in one sample
MAX_SAMPLES: Final = 8192  # samples in one metrics batch (the agent sends at most 3600)

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
#: An incarnation id: 8..32 lower-case hex digits, or "" (a sender that predates incarnations).
INCARNATION_PATTERN: Final = r"^([0-9a-f]{8,32})?$"
Incarnation = Annotated[str, msgspec.Meta(pattern=INCARNATION_PATTERN)]
Target = Annotated[str, msgspec.Meta(pattern=TARGET_PATTERN)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
Key = Annotated[str, msgspec.Meta(max_length=MAX_KEY)]
Finite = Annotated[float, msgspec.Meta(ge=-MAX_FLOAT, le=MAX_FLOAT)]
Wall = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_WALL)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Labels = Annotated[dict[Key, Text], msgspec.Meta(max_length=MAX_LABELS)]
Names = Annotated[list[Key], msgspec.Meta(max_length=MAX_ITEMS)]
Scalar = Text | int | Finite | bool | None
#: Arguments and results: flat maps of scalars or lists of scalars (no free-form nesting).
Args = Annotated[dict[Key, Scalar | Annotated[list[Scalar], msgspec.Meta(max_length=MAX_ARGS)]],
                 msgspec.Meta(max_length=MAX_ARGS)]


class Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", omit_defaults=True):
    """Fields every message carries. ``kind`` is written by msgspec from the subclass tag."""

    v: int  # protocol version; always written, never defaulted on decode
    node: Id  # the sending node (for commands: the target, see Command)
    site: Id
    seq: Seq  # per-sender sequence number: strictly increasing, never reused (dedupe key with node)
    ts: Wall  # wall clock (time.time()) when the message was created; kept on replay
    mono: Finite | None = None  # sender's time.monotonic() at creation, where meaningful
    # The sender's incarnation: new whenever its state directory (and with it its seq counter) is
    # new, e.g. after a reinstall. ``seq`` is strictly increasing within one incarnation; the
    # dedupe key is (node, inc, seq). "" for agents before it existed (one legacy incarnation).
    inc: Incarnation = ""


class Birth(Envelope, tag="birth", kw_only=True, frozen=True, omit_defaults=True):
    """Who this node is; published (QoS 1, retained) on every connect."""

    bdseq: Count  # birth/death sequence: +1 per connect; the matching will carries the same value
    agent_version: Text
    model_version: Text = ""
    labels: Labels = msgspec.field(default_factory=dict)
    collectors: Names = msgspec.field(default_factory=list)
    capabilities: Names = msgspec.field(default_factory=list)
    hostname: Text = ""
    boot_ts: Wall | None = None  # when the agent process started (wall clock)


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
    wall: Wall
    mono: Finite
    metrics: Annotated[dict[Key, Finite | None], msgspec.Meta(max_length=MAX_METRICS)]


class Metrics(Envelope, tag="metrics", kw_only=True, frozen=True, omit_defaults=True):
    """A batch of samples' metric dicts (oldest first). QoS 0."""

    samples: Annotated[list[MetricSample], msgspec.Meta(max_length=MAX_SAMPLES)]


class Contribution(msgspec.Struct, frozen=True):
    feature: Key
    share: Probability  # the share of the anomaly this feature explains


class Forecast(msgspec.Struct, frozen=True, kw_only=True):
    resource: Key
    eta_s: Finite | None
    confidence: Probability
    rate_per_s: Finite


class GpuRisk(msgspec.Struct, frozen=True, kw_only=True):
    gpu: Key  # the GPU's metric label (NVML index)
    pci: Key = ""  # PCI bus id
    score: Probability
    reasons: Annotated[list[Key], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(default_factory=list)


class Risk(Envelope, tag="risk", kw_only=True, frozen=True, omit_defaults=True):
    """Failure risk from the on-device model, sent when it changes. QoS 1."""

    sample_seq: Seq
    anomaly: Finite | None  # 1.0 is the alert threshold; None while cold
    alert: bool
    cold: bool
    model_version: Text
    explanation: Annotated[list[Contribution], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(
        default_factory=list)
    failure: Annotated[dict[Key, Probability], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(
        default_factory=dict)
    forecasts: Annotated[list[Forecast], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(
        default_factory=list)
    # per-GPU failure risk with its reasons (added in v1: older decoders ignore it)
    gpu: Annotated[list[GpuRisk], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(default_factory=list)


class Event(Envelope, tag="event", kw_only=True, frozen=True, omit_defaults=True):
    """Something that happened (an XID, an OOM kill, a link down, the spool dropping metrics). QoS 1."""

    name: Name  # event type, e.g. "gpu.xid", "report.spool_dropped"
    source: Text
    wall: Wall  # when it happened (ts is when the message was built)
    labels: Labels = msgspec.field(default_factory=dict)
    value: Finite | None = None
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
    duration_s: Finite | None = None


class Command(Envelope, tag="command", kw_only=True, frozen=True, omit_defaults=True):
    """A command from the coordinator. ``node``/``site`` are the *target* (``*`` = all).

    The signature covers the other fields; it is verified by the act stage, not here.
    """

    node: Target
    site: Target
    id: Name
    issuer: Text = ""
    issued_at: Wall
    expires_at: Wall
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


Hours = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_FLOAT)]
#: resources in one cost message's demand summary, and points in one forecast
MAX_DEMAND: Final = 64
MAX_DEMAND_POINTS: Final = 2016
Points = Annotated[list[Finite], msgspec.Meta(max_length=MAX_DEMAND_POINTS)]


class DemandSummary(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """One resource's demand in a cost message: the period's mean, what the forecast sent with the
    previous summary said it would be, and the forecast from ``end`` on (``step_s`` apart)."""

    resource: Key
    actual: Finite | None = None  # the period's mean
    predicted: Finite | None = None  # the previous summary's forecast, averaged over this period
    step_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_WALL)] = 0.0
    point: Points = msgspec.field(default_factory=list)
    lo: Points = msgspec.field(default_factory=list)
    hi: Points = msgspec.field(default_factory=list)


class Cost(Envelope, tag="cost", kw_only=True, frozen=True, omit_defaults=True):
    """What the node's resources idled over ``[start, end]``: resource-hours (and money at the node's
    prices, ``currency`` "" when none are set). One per ``[cost] summary_interval_s`` and at stop. QoS 1."""

    start: Wall
    end: Wall
    node_class: Annotated[str, msgspec.Meta(max_length=64)] = ""
    currency: Annotated[str, msgspec.Meta(max_length=16)] = ""
    money: Hours = 0.0
    seconds: Hours = 0.0  # sample time credited
    core_h: Hours = 0.0
    idle_core_h: Hours = 0.0
    cores_under_line_h: Hours = 0.0
    gpu_h: Hours = 0.0
    idle_gpu_h: Hours = 0.0
    gpu_mem_idle_gib_h: Hours = 0.0
    mem_stranded_gib_h: Hours = 0.0
    energy_kwh: Hours = 0.0
    # demand forecasts against what came (added within v1: older receivers ignore it)
    demand: Annotated[list[DemandSummary], msgspec.Meta(max_length=MAX_DEMAND)] = msgspec.field(
        default_factory=list)


Message = Birth | Status | Metrics | Risk | Event | Action | Command | CommandAck | Cost

MESSAGE_TYPES: Final[tuple[type[Envelope], ...]] = (
    Birth, Status, Metrics, Risk, Event, Action, Command, CommandAck, Cost,
)
#: kind tag -> class
KINDS: Final[dict[str, type[Envelope]]] = {str(cls.__struct_config__.tag): cls for cls in MESSAGE_TYPES}


def kind_of(message: Envelope | type[Envelope]) -> str:
    """The ``kind`` tag of a message (instance or class)."""
    cls = message if isinstance(message, type) else type(message)
    return str(cls.__struct_config__.tag)
