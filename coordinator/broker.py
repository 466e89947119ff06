"""The embedded MQTT broker (amqtt, optional extra ``heald[embedded]``).

Used when ``[mqtt] host`` is empty, so ``heald-coordinator`` plus ``heald run`` try the whole
system on one machine. It binds loopback only — an embedded broker has no authentication and
no TLS, so it is refused on any other address. For a fleet, run mosquitto (or any MQTT 3.1.1+
broker) and set ``mqtt.host``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import structlog

from coordinator.errors import BrokerUnavailable

log = structlog.get_logger("coordinator.broker")

INSTALL_HINT = (
    "the embedded MQTT broker needs amqtt: pip install 'heald[embedded]' (or amqtt), "
    "or point [mqtt] host at a broker such as mosquitto"
)


def check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BrokerUnavailable(
            f"embedded broker address {host!r} must be a loopback IP (127.0.0.1)"
        ) from None
    if not ip.is_loopback:
        raise BrokerUnavailable(
            f"the embedded broker has no authentication, so it binds loopback only; "
            f"{host} is not loopback (run mosquitto for remote agents)"
        )


def amqtt_available() -> bool:
    try:
        import amqtt.broker  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@contextlib.asynccontextmanager
async def embedded_broker(host: str, port: int) -> AsyncIterator[None]:
    """Run an amqtt broker on ``host:port`` for the duration of the context."""
    check_loopback(host)
    try:
        from amqtt.broker import Broker  # noqa: PLC0415 - optional extra (untyped: see amqtt_available)
    except ImportError as exc:
        raise BrokerUnavailable(f"{INSTALL_HINT} ({exc})") from None
    for name in ("amqtt", "transitions"):  # amqtt logs every packet at INFO through stdlib logging
        logging.getLogger(name).setLevel(logging.WARNING)
    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    try:
        await broker.start()
    except Exception as exc:
        raise BrokerUnavailable(f"cannot start the embedded broker on {host}:{port}: {exc}") from exc
    log.info(
        "embedded mqtt broker started",
        listen=f"{host}:{port}",
        note="loopback only, anonymous; use mosquitto for a real fleet",
    )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await broker.shutdown()
