"""Settings of the report stage (``[mqtt]`` in agent.toml)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class TlsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class SpoolSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Total bytes the on-disk spool may use before the oldest metrics are dropped.
    quota_bytes: Annotated[int, msgspec.Meta(ge=65536)] = 256 * 1024 * 1024
    segment_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 4 * 1024 * 1024
    # How often spooled records are fsynced and the replay cursor persisted (power loss costs at most this).
    fsync_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0


class MqttSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Off by default: `heald run` with the example config heals locally with no broker.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    username: str | None = None
    password_file: str | None = None
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    tls: TlsSettings = TlsSettings()
    max_publish_per_s: Annotated[float, msgspec.Meta(gt=0)] = 200.0
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 256 * 1024
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=10)] = 8
    backoff_initial_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    backoff_max_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    metrics_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # A QoS 1 publish not acknowledged within this is treated as a dead link: reconnect and replay.
    ack_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    # MQTT client id; default "heald-<site>-<node>".
    client_id: str | None = None
    # "auto": MQTT 5, or 3.1.1 from the first time a broker refuses 5 (the coordinator's embedded
    # broker speaks only 3.1.1) until the agent restarts; "5" or "3.1.1": only that one. A broker
    # that neither speaks 5 nor refuses it (amqtt run on its own) needs "3.1.1".
    protocol: Literal["auto", "5", "3.1.1", 5] = "auto"
    # false: a persistent session. The broker keeps the node's command subscriptions and queues the
    # commands sent while it is away (a restart, a network outage) for its return.
    clean_start: bool = False
    # How long the broker keeps that session after a disconnect (MQTT 5; a 3.1.1 broker keeps it
    # until its own limit). A command expires within an hour (the coordinator's
    # signing.command_ttl_s), so nothing queued for longer could still run.
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)] = 3600
    # Messages submitted but not yet written to the spool (memory); beyond it new metrics are dropped.
    queue_max: Annotated[int, msgspec.Meta(ge=16)] = 10000
    spool: SpoolSettings = SpoolSettings()
