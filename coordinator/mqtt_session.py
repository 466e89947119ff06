"""The coordinator's MQTT protocol choice and session options.

The same rules as the agent's (``agent/report/protocol.py``, which the coordinator may not import:
docs/architecture.md): ``protocol = "auto"`` connects with MQTT 5 and falls back to 3.1.1 when a
broker refuses 5 (CONNACK 0x01, reason code 132 "Unsupported protocol version" to a v5 client:
the embedded broker, amqtt, does that), until the coordinator restarts. The session is persistent
by default (``clean_start = false``, ``session_expiry_s``), so the broker queues the QoS 1
reports that arrive while this replica is away.

On 3.1.1 the coordinator loses the session expiry (the broker keeps the session until its own
limit), the expiry of queued commands (MQTT 5 message expiry: a command for an absent node is
dropped by the broker when it expires; on 3.1.1 it waits in the node's session and the node
refuses it as expired) and the reason codes of CONNACK/DISCONNECT in its logs.
"""

from __future__ import annotations

import time
from typing import Any, Final

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

#: paho's reason code for "Unsupported protocol version" (MQTT 5 0x84; a 3.1.1 broker's return
#: code 0x01 is reported as this too), and that 3.1.1 return code itself.
UNSUPPORTED_PROTOCOL_VERSION: Final = 132
REFUSED_PROTOCOL_VERSION: Final = 1


def protocol_refused(exc: BaseException) -> bool:
    """True when ``exc`` is a broker refusing the protocol version of a CONNECT."""
    if not isinstance(exc, MqttConnectError):
        return False
    rc = exc.rc
    if isinstance(rc, int):
        return rc == REFUSED_PROTOCOL_VERSION
    return rc is not None and rc.value == UNSUPPORTED_PROTOCOL_VERSION


class ProtocolChoice:
    """The configured protocol, or (``auto``) MQTT 5 until a broker refuses it, then 3.1.1."""

    def __init__(self, setting: object) -> None:
        self.setting = str(setting)
        self.fell_back = False

    @property
    def version(self) -> aiomqtt.ProtocolVersion:
        if self.setting == "3.1.1" or self.fell_back:
            return aiomqtt.ProtocolVersion.V311
        return aiomqtt.ProtocolVersion.V5

    @property
    def name(self) -> str:
        return "5" if self.version is aiomqtt.ProtocolVersion.V5 else "3.1.1"

    def fall_back(self, exc: BaseException) -> bool:
        """After a failed connect: True when MQTT 5 was refused and ``auto`` now uses 3.1.1 (once)."""
        if self.setting != "auto" or self.fell_back or not protocol_refused(exc):
            return False
        self.fell_back = True
        return True


#: Room for a PUBLISH packet's fixed header, topic and properties around a payload.
PACKET_OVERHEAD_BYTES: Final = 4096


def session_options(version: aiomqtt.ProtocolVersion, *, clean_start: bool,
                    session_expiry_s: int, max_payload_bytes: int | None = None) -> dict[str, Any]:
    """``aiomqtt.Client`` keyword arguments: MQTT 5 clean start and session expiry, or 3.1.1's
    clean session flag.

    ``max_payload_bytes``: on MQTT 5 the CONNECT's Maximum Packet Size, so that the broker drops a
    message too large for the coordinator instead of delivering it (a publisher flooding big
    payloads then costs the coordinator nothing: each would be received, held in memory and
    refused). 3.1.1 has no such property: the broker's own limit (mosquitto's
    ``max_packet_size``, docs/mqtt-tls-acl.md) does it there.
    """
    if version is aiomqtt.ProtocolVersion.V5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
        properties.SessionExpiryInterval = session_expiry_s
        if max_payload_bytes is not None:
            properties.MaximumPacketSize = max_payload_bytes + PACKET_OVERHEAD_BYTES
        return {"clean_start": clean_start, "properties": properties}
    return {"clean_session": clean_start}


def command_properties(version: aiomqtt.ProtocolVersion, expires_at: float) -> Properties | None:
    """MQTT 5: a command's message expiry, so that a broker drops it, unsent, once it has expired
    (it would wait in an absent node's session otherwise). None on 3.1.1."""
    if version is not aiomqtt.ProtocolVersion.V5:
        return None
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
    properties.MessageExpiryInterval = max(1, int(expires_at - time.time() + 1))
    return properties
