"""The coordinator process: store + MQTT bus + signer + web server under one TaskGroup.

This is where the parts are put together (the only module that imports both the replica's
logic, :mod:`coordinator.replica`, and the web layer, :mod:`coordinator.web.app`); ``heald-coordinator
run`` calls :func:`serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog

from agent.wire.signing import CommandSigner, key_id, load_or_create_private_key, public_key_text
from coordinator.broker import embedded_broker
from coordinator.config import CoordinatorSettings, parse_listen
from coordinator.notify import Notifier
from coordinator.replica import Coordinator
from coordinator.store import open_store
from coordinator.web.app import run_web

log = structlog.get_logger("coordinator")


def make_signer(settings: CoordinatorSettings) -> CommandSigner:
    """The replica's command signer, with the key in ``state_dir`` (made on first use)."""
    key = load_or_create_private_key(settings.key_path)
    return CommandSigner(key, issuer=key_id(key.public_key()), ttl_s=settings.signing.command_ttl_s)


@contextlib.asynccontextmanager
async def _maybe_embedded(
    settings: CoordinatorSettings,
) -> AsyncIterator[tuple[str, int, asyncio.Event | None]]:
    """The broker to connect to; for the embedded one, also the event that lets the agents in once
    this replica has subscribed (:func:`coordinator.broker.embedded_broker`)."""
    if settings.embedded_broker:
        host, port = parse_listen(settings.mqtt.embedded_listen)
        async with embedded_broker(host, port, first_client=settings.mqtt_client_id) as subscribed:
            yield host, port, subscribed
    else:
        yield settings.mqtt.host, settings.mqtt.port, None


async def _when_subscribed(coord: Coordinator, subscribed: asyncio.Event) -> None:
    await coord.bus.ready.wait()
    subscribed.set()


async def serve(settings: CoordinatorSettings) -> None:
    """Run one coordinator replica until cancelled."""
    signer = make_signer(settings)
    store = await open_store(settings.store_url, settings.store, settings.budget, replica=settings.replica_id)
    try:
        notify = settings.notify
        notifier = Notifier(notify, store.db, replica=settings.replica_id) if notify.routes else None
        async with _maybe_embedded(settings) as (host, port, subscribed):
            coord = Coordinator(settings, store, signer, mqtt_host=host, mqtt_port=port)
            log.info(
                "coordinator starting",
                replica=coord.replica,
                store=store.db.dialect.name,
                mqtt=f"{host}:{port}",
                embedded_broker=settings.embedded_broker,
                signing_key_id=signer.issuer,
                public_key=public_key_text(signer.public_key),
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(coord.bus.run(), name="mqtt-bus")
                if subscribed is not None:
                    tg.create_task(_when_subscribed(coord, subscribed), name="embedded-broker-open")
                tg.create_task(coord.prune_loop(), name="store-prune")
                if notifier is not None:
                    coord.extra_info["notify"] = notifier.info
                    tg.create_task(notifier.run(), name="notify")
                if settings.web.enabled:
                    tg.create_task(run_web(coord), name="web")
    finally:
        await store.close()


__all__ = ["Coordinator", "make_signer", "serve"]
