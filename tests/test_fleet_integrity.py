"""One node's bad data never costs another node's (issue 18, item 1), with the real peers.

A real mosquitto, a real coordinator process (SQLite, and PostgreSQL when it answers), a real
``heald run`` agent and a simulated node sending an event every 50 ms are the healthy side; a
hostile publisher on the same broker sends, for 30 s, what used to cost them their data: events
whose ``wall`` is NaN (the issue's case: valid msgpack that the store could not write, so the
coordinator retried and then dropped whole batches), infinite values, NaN metrics, oversized
strings and maps, a counter no database column holds, a payload over the size limit, reports on
its own topic in another node's name, and reports that pass the decoder but that the database
refuses (SQLite: a trigger refusing an event name; PostgreSQL: a NUL in a string, which it cannot
store). Batches are written every 0.5 s, so nearly every batch mixes both sides.

Counted at the store: every report of both healthy nodes is there (none lost); none of the
hostile node's is; every hostile message is rejected and counted for the hostile node, by reason,
in ``/api/info``; and the real agent never sent anything its coordinator rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import msgspec
import pytest
from broker import Broker
from test_coordinator_store import PG_ADMIN, pg_available

from agent import wire
from devtools.coordinator_proc import REPO_ROOT, CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimNode, publish

pytestmark = pytest.mark.slow

DURATION_S = 30.0
SITE = "lab"
AGENT, SIM, HOSTILE = "healthy-agent", "healthy-sim", "hostile"
POISON = "poison.store"  # the event name the SQLite store is made to refuse

#: Where each kind lands in the store: (table, kind filter for the presence table).
TABLES = {"birth": "presence", "status": "presence", "metrics": "metrics", "risk": "risk", "event": "events",
          "action": "actions", "command_ack": "acks"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coord.db'}"
        return
    if not pg_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (postgres user, trust auth)")
    import psycopg  # noqa: PLC0415

    name = f"heald_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the coordinator's store directly (the count at the store)."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"), timeout=30)) as conn:
            return list(conn.execute(sql, params))
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url, autocommit=True) as conn:
        return list(conn.execute(sql.replace("?", "%s"), params))


def seqs(url: str, node: str, kind: str) -> set[int]:
    return {row[0] for row in query(url, f"SELECT seq FROM {TABLES[kind]} WHERE node = ?", (node,))}  # noqa: S608


@pytest.fixture
def coordinator(mosquitto: Broker, tmp_path: Path, store_url: str) -> Iterator[CoordinatorProcess]:
    port = free_port()
    cfg = write_config(tmp_path / "coord", mqtt_port=mosquitto.port, web_port=port, store_url=store_url,
                       store={"batch_interval_s": 0.5})
    proc = CoordinatorProcess(cfg, port)
    proc.start()
    if store_url.startswith("sqlite:///"):  # a failure only the store sees: a trigger refusing one name
        query(store_url, f"CREATE TRIGGER refuse_poison BEFORE INSERT ON events WHEN NEW.name = '{POISON}' "
                         "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    yield proc
    proc.stop()


@pytest.fixture
def agent(mosquitto: Broker, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    d = tmp_path / "agent"
    d.mkdir()
    cfg = d / "agent.toml"
    cfg.write_text(
        f'[node]\nid = "{AGENT}"\nsite = "{SITE}"\nlabels = {{ rack = "r1" }}\n'
        f'[paths]\nstate_dir = "{d / "state"}"\nruntime_dir = "{d / "run"}"\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {mosquitto.port}\nmetrics_interval_s = 1.0\n'
        '[collect.gpu]\nenabled = false\n[playbooks]\nforce_mode = "dry-run"\n[log]\nformat = "json"\n'
    )
    log_path = d / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT)
    try:
        yield proc, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# ------------------------------------------------------------------ the hostile publisher's repertoire
Hostile = Callable[[SimNode, bool], tuple[str, bytes, str]]  # -> (topic, payload, the reason it is rejected)


def _event_doc(n: SimNode, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(n.event("disk.readonly", {"mount": "/"}))
    doc.update(fields)
    return doc


def _topic(kind: str) -> str:
    return wire.topic_for(SITE, HOSTILE, kind)


def nan_wall(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    return _topic("event"), msgpack.packb(_event_doc(n, wall=math.nan)), "decode"


def inf_value(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    return _topic("event"), msgpack.packb(_event_doc(n, value=math.inf)), "decode"


def nan_metric(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    doc = msgspec.to_builtins(n.metrics(2))
    doc["samples"][1]["metrics"]["cpu.util"] = math.nan
    return _topic("metrics"), msgpack.packb(doc), "decode"


def minus_inf_anomaly(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    doc = msgspec.to_builtins(n.risk(0.5))
    doc["anomaly"] = -math.inf
    return _topic("risk"), msgpack.packb(doc), "decode"


def long_label(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    return _topic("event"), msgpack.packb(_event_doc(n, labels={"mount": "/" * 5000})), "decode"


def many_labels(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    doc = msgspec.to_builtins(n.birth())
    doc["labels"] = {f"l{i}": "x" for i in range(300)}
    return _topic("birth"), msgpack.packb(doc), "decode"


def huge_counter(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    doc = msgspec.to_builtins(n.status("online"))
    doc["dropped_metrics"] = 2**64 - 1  # valid msgpack; no BIGINT column holds it
    return _topic("status"), msgpack.packb(doc), "decode"


def over_the_size_limit(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    return _topic("event"), msgpack.packb(_event_doc(n, message="x" * 300_000)), "too_large"


def in_another_nodes_name(n: SimNode, _: bool) -> tuple[str, bytes, str]:
    return _topic("event"), msgpack.packb(_event_doc(n, node=SIM)), "topic_mismatch"


def refused_by_the_store(n: SimNode, postgres: bool) -> tuple[str, bytes, str]:
    """Valid on the wire; the database will not take it."""
    doc = _event_doc(n, message="a\x00b") if postgres else _event_doc(n, name=POISON)
    return _topic("event"), msgpack.packb(doc), "store"


REPERTOIRE: list[Hostile] = [nan_wall, inf_value, nan_metric, minus_inf_anomaly, long_label, many_labels,
                             huge_counter, nan_wall, in_another_nodes_name, refused_by_the_store, nan_wall,
                             refused_by_the_store]


async def hostile_publisher(port: int, stop: asyncio.Event, postgres: bool, sent: Counter[str]) -> None:
    n = SimNode(HOSTILE, site=SITE)
    async with aiomqtt.Client("127.0.0.1", port, identifier="hostile-publisher") as client:
        i = 0
        while not stop.is_set():
            make = over_the_size_limit if i % 50 == 25 else REPERTOIRE[i % len(REPERTOIRE)]
            topic, payload, reason = make(n, postgres)
            await client.publish(topic, payload, qos=1)  # acknowledged by the broker: the coordinator gets it
            sent[reason] += 1
            i += 1
            await asyncio.sleep(0.1)


async def healthy_sim(port: int, stop: asyncio.Event, sent: list[int]) -> None:
    n = SimNode(SIM, site=SITE, labels={"rack": "r2"})
    async with aiomqtt.Client("127.0.0.1", port, identifier="healthy-sim") as client:
        await publish(client, n.birth())
        await publish(client, n.status("online"))
        i = 0
        while not stop.is_set():
            event = n.event("gpu.xid", {"gpu": str(i % 8)}, message=f"healthy {i}", value=float(i))
            await publish(client, event)  # QoS 1: acknowledged by the broker
            sent.append(event.seq)
            i += 1
            await asyncio.sleep(0.05)


async def observe(port: int, seen: list[wire.Message], ready: asyncio.Event) -> None:
    """Every report the real agent publishes, as the broker delivers it."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="observer") as client:
        await client.subscribe(f"heald/v1/{SITE}/{AGENT}/+", qos=1)
        ready.set()
        async for message in client.messages:  # appended as they come: the test watches the list
            if isinstance(message.payload, bytes):
                seen.append(wire.decode(message.payload))  # noqa: PERF401 - read while it grows


def test_a_hostile_node_costs_the_healthy_ones_nothing(
    mosquitto: Broker, coordinator: CoordinatorProcess, agent: tuple[subprocess.Popen[bytes], Path],
    store_url: str,
) -> None:
    agent_proc, agent_log = agent
    postgres = store_url.startswith("postgresql")
    sim_sent: list[int] = []
    hostile_sent: Counter[str] = Counter()
    seen: list[wire.Message] = []

    async def scenario() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        observer = asyncio.create_task(observe(mosquitto.port, seen, ready), name="observer")
        await ready.wait()
        deadline = time.monotonic() + 60
        while not any(isinstance(m, wire.Birth) for m in seen):  # the agent is up
            assert time.monotonic() < deadline, agent_log.read_text()[-3000:]
            assert agent_proc.poll() is None, agent_log.read_text()[-3000:]
            await asyncio.sleep(0.2)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(healthy_sim(mosquitto.port, stop, sim_sent), name="healthy-sim")
            tg.create_task(hostile_publisher(mosquitto.port, stop, postgres, hostile_sent), name="hostile")
            await asyncio.sleep(DURATION_S)
            stop.set()
        agent_proc.send_signal(signal.SIGTERM)  # a clean stop: its last reports and the offline status
        await asyncio.to_thread(agent_proc.wait, 30)
        await asyncio.sleep(1.0)  # the observer's last deliveries
        observer.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await observer

    asyncio.run(scenario())
    assert agent_proc.returncode == 0, agent_log.read_text()[-3000:]
    total_hostile = sum(hostile_sent.values())
    # the oversized ones never reach the coordinator: its MQTT 5 CONNECT's Maximum Packet Size has
    # the broker drop them (coordinator/mqtt_session.py); every other one is rejected and counted
    reached = total_hostile - hostile_sent["too_large"]
    counted = {reason: n for reason, n in hostile_sent.items() if reason != "too_large"}
    assert hostile_sent["decode"] > 100
    assert hostile_sent["store"] > 20
    assert hostile_sent["too_large"] > 0
    assert len(sim_sent) > 300

    def ingested(c: CoordinatorProcess) -> dict[str, Any] | None:
        status, info = c.api("GET", "/api/info")
        assert status == 200, info
        ingest: dict[str, Any] = info["ingest"]
        hostile = ingest["rejected"]["nodes"].get(HOSTILE, {})
        done = (hostile.get("total") == reached and ingest["queue_depth"] == 0
                and seqs(store_url, SIM, "event") >= set(sim_sent))
        return ingest if done else None

    ingest = coordinator.wait_for(ingested, timeout=60, interval=0.5)

    # 0 reports of the healthy nodes lost, counted at the store
    assert seqs(store_url, SIM, "event") == set(sim_sent)
    by_kind: dict[str, set[int]] = {}
    for m in seen:
        by_kind.setdefault(wire.kind_of(m), set()).add(m.seq)
    assert {"birth", "status", "metrics", "risk"} <= set(by_kind), sorted(by_kind)
    stored_presence = seqs(store_url, AGENT, "status")
    for kind, expected in by_kind.items():
        stored = stored_presence if TABLES[kind] == "presence" else seqs(store_url, AGENT, kind)
        assert expected <= stored, f"{kind}: {len(expected - stored)} of {len(expected)} lost"
    # ... and none of the hostile node's, on any table
    for table in sorted(set(TABLES.values())):
        assert query(store_url, f"SELECT COUNT(*) FROM {table} WHERE node = ?", (HOSTILE,)) == [(0,)]  # noqa: S608
    assert query(store_url, "SELECT COUNT(*) FROM nodes WHERE node = ?", (HOSTILE,)) == [(0,)]

    # every hostile message rejected and counted for the hostile node, by reason
    rejected = ingest["rejected"]
    assert rejected["nodes"] == {HOSTILE: {"total": reached, **counted}}
    assert rejected["by_reason"].get("too_large", 0) == 0
    assert ingest["store_rejected"] == hostile_sent["store"]
    assert ingest["malformed_total"] == reached - hostile_sent["store"]
    assert (ingest["dropped_batches"], ingest["store_errors"]) == (0, 0)
    assert ingest["processed"] >= len(sim_sent) + len(seen)
    # logged, but not once per message
    log = coordinator.log_text()
    assert 1 <= log.count("report rejected") <= 5, log[-3000:]
    assert "dropping batch" not in log

    # the real agent never sent anything its coordinator rejects
    agent_text = agent_log.read_text()
    assert "report.message_invalid" not in agent_text
