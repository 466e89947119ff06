"""The coordinator's MQTT loop stops when cancelled, and reconnects when the link is lost.

As for the agent's reporter (tests/test_report_stop.py): aiomqtt's ``__aexit__`` can raise
``MqttError("Operation timed out")`` from inside a cancellation (its DISCONNECT wait), which the
loop catches to reconnect; injected here on a real session with a real mosquitto."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import TracebackType

import aiomqtt
import pytest
from broker import Broker

from coordinator.config import MqttSection
from coordinator.ingest import Bus
from coordinator.model import BatchResult, Incoming


def bus_for(broker: Broker) -> Bus:
    async def apply(_batch: list[Incoming]) -> BatchResult:
        return BatchResult()

    async def after(_result: BatchResult) -> None:
        return None

    return Bus(MqttSection(), host=broker.host, port=broker.port, client_id=f"stop-{time.monotonic_ns()}",
               apply=apply, after_batch=after, batch_max=100, batch_interval_s=0.05, queue_max=100)


async def connects(bus: Bus, task: asyncio.Task[None], n: int) -> None:
    deadline = time.monotonic() + 30
    while bus.stats.connects < n:
        assert not task.done(), f"the loop ended: {task}"
        assert time.monotonic() < deadline, f"{bus.stats.connects} connects, wanted {n}"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_cancel_ends_the_loop_when_disconnect_times_out(mosquitto: Broker, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    original = aiomqtt.Client.__aexit__
    timed_out = 0

    async def disconnect_times_out(self: aiomqtt.Client, exc_type: type[BaseException] | None,
                                   exc: BaseException | None, tb: TracebackType | None) -> None:
        nonlocal timed_out
        await original(self, exc_type, exc, tb)
        if exc_type is asyncio.CancelledError:
            timed_out += 1
            raise aiomqtt.MqttError("Operation timed out")

    monkeypatch.setattr(aiomqtt.Client, "__aexit__", disconnect_times_out)
    bus = bus_for(mosquitto)
    task = asyncio.create_task(bus._connection_loop(), name="test-coordinator-mqtt")
    await connects(bus, task, 1)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done, f"still running after its cancellation ({bus.stats.connects} connects)"
    assert task.cancelled()
    assert timed_out == 1
    assert bus.stats.connects == 1


@pytest.mark.asyncio
async def test_a_lost_link_reconnects_and_still_stops(mosquitto: Broker) -> None:
    bus = bus_for(mosquitto)
    task = asyncio.create_task(bus._connection_loop(), name="test-coordinator-mqtt")
    try:
        await connects(bus, task, 1)
        for n in (2, 3):
            await asyncio.to_thread(mosquitto.restart)
            await connects(bus, task, n)
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done
    assert task.cancelled()
