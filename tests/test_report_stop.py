"""The reporter stops when cancelled, even when aiomqtt turns the cancellation into an MqttError.

aiomqtt's ``Client.__aexit__`` sends DISCONNECT and waits for it (its ``timeout``, 10 s by default);
when that wait times out it raises ``MqttError("Operation timed out")`` — from inside a
cancellation. The reporter's connection loop catches MqttError to reconnect, so without a check the
cancellation was lost and the daemon's stop waited for a reporter that kept reconnecting. The
timeout is injected here (a real broker, a real session; only the disconnect's outcome is forced),
the one fault a test cannot get from a healthy local mosquitto on demand."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import TracebackType

import aiomqtt
import pytest
from broker import Broker

from agent.report import build
from agent.report.settings import MqttSettings, SpoolSettings
from agent.report.transport import Reporter


@pytest.mark.asyncio
async def test_cancel_ends_the_reporter_when_disconnect_times_out(mosquitto: Broker, tmp_path: Path,
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
    settings = MqttSettings(enabled=True, host=mosquitto.host, port=mosquitto.port, backoff_initial_s=0.05,
                            backoff_max_s=0.1, connect_timeout_s=3.0,
                            spool=SpoolSettings(fsync_interval_s=0.2))
    reporter = Reporter(settings, node="n1", site="lab", state_dir=tmp_path)
    task = asyncio.create_task(reporter.run(), name="test-reporter")
    deadline = time.monotonic() + 20
    while reporter.counters.connects < 1:
        assert time.monotonic() < deadline, "the reporter never connected"
        await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done, f"still running after its cancellation ({reporter.counters.connects} connects)"
    assert task.cancelled()
    assert timed_out == 1  # the injected fault happened, once: no reconnect after it
    assert reporter.counters.connects == 1


@pytest.mark.asyncio
async def test_a_lost_connection_is_no_cancellation(mosquitto: Broker, tmp_path: Path) -> None:
    """The sibling: a broker restart ends the session through the reporter's TaskGroup (a child
    fails); on Python 3.11 that leaves the task's cancel count at 1 (Task.cancelling()), which an
    earlier version of the stop check took for a stop: the reporter never reconnected. It must
    reconnect, and still stop when cancelled."""
    settings = MqttSettings(enabled=True, host=mosquitto.host, port=mosquitto.port, backoff_initial_s=0.05,
                            backoff_max_s=0.2, connect_timeout_s=3.0,
                            spool=SpoolSettings(fsync_interval_s=0.2))
    reporter = Reporter(settings, node="n1", site="lab", state_dir=tmp_path)
    task = asyncio.create_task(reporter.run(), name="test-reporter")

    async def connects(n: int) -> None:
        deadline = time.monotonic() + 30
        while reporter.counters.connects < n:
            assert not task.done(), f"the reporter ended: {task}"
            assert time.monotonic() < deadline, f"{reporter.counters.connects} connects, wanted {n}"
            reporter.submit(build.report_event("tick", value=1.0))  # a publish finds the link gone
            await asyncio.sleep(0.2)

    try:
        await connects(1)
        for n in (2, 3):
            await asyncio.to_thread(mosquitto.restart)
            await connects(n)
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done
    assert task.cancelled()
