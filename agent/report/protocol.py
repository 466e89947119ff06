"""Which MQTT protocol a session speaks, and the session options for it.

``[mqtt] protocol = "auto"`` (the default) connects with MQTT 5. A broker that speaks only
3.1.1 refuses that CONNECT with CONNACK return code 0x01 (paho reports it to an MQTT 5 client as
reason code 132, "Unsupported protocol version"; the coordinator's embedded broker, amqtt,
answers so through its front door, :mod:`coordinator.broker`). On that refusal the reporter
falls back to 3.1.1 at once and keeps it until the agent restarts, logging it once.

Everything the agent relies on works the same on both: the retained ``birth`` and ``status``,
the last will, QoS 1 publishes acknowledged by PUBACK, the QoS 1 command subscriptions, the
client's in-flight limit (``max_inflight``) and the persistent session. What 3.1.1 lacks:
the session expiry (a 3.1.1 broker keeps a persistent session until its own limit, not
``session_expiry_s``) and the reason codes MQTT 5 puts in CONNACK/DISCONNECT (the logs then say
less about why a broker refused or dropped the connection). The agent uses no topic alias and
no user property.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

#: paho's reason code for a broker that refused the protocol version (MQTT 5 0x84; a 3.1.1
#: broker's return code 0x01 arrives as this too).
UNSUPPORTED_PROTOCOL_VERSION: Final = 132
#: The return code itself, as paho gives it to a 3.1.1 client.
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
    """The protocol of the next connection: the configured one, or (``auto``) MQTT 5 until a
    broker refuses it, then 3.1.1 for as long as this object lives (one agent run)."""

    def __init__(self, setting: Literal["auto", "5", "3.1.1", 5]) -> None:
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
        """After a failed connect: True when it was MQTT 5 refused and ``auto`` now uses 3.1.1
        (once: a 3.1.1 refusal, or a second one, is an ordinary connect failure)."""
        if self.setting != "auto" or self.fell_back or not protocol_refused(exc):
            return False
        self.fell_back = True
        return True


def session_options(version: aiomqtt.ProtocolVersion, *, clean_start: bool,
                    session_expiry_s: int) -> dict[str, Any]:
    """``aiomqtt.Client`` keyword arguments for the session: MQTT 5 clean start and session
    expiry, or the 3.1.1 clean session flag."""
    if version is aiomqtt.ProtocolVersion.V5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
        properties.SessionExpiryInterval = session_expiry_s
        return {"clean_start": clean_start, "properties": properties}
    return {"clean_session": clean_start}
