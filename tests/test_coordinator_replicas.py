"""Two coordinator replicas share the load through `$share/...` subscriptions on mosquitto and a
shared PostgreSQL (a fresh database per test). Every message is processed exactly once across them,
including the retained presence both replicas receive and messages the nodes send twice."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker

from devtools.coordinator_proc import CoordinatorProcess, free_port, write_config
from devtools.fleet_sim import SimNode, publish

pytestmark = pytest.mark.slow

PG_ADMIN = "postgresql://postgres@127.0.0.1/postgres"


@pytest.fixture
def pg_url() -> Iterator[str]:
    try:
        import psycopg  # noqa: PLC0415

        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=2)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL is not reachable on 127.0.0.1:5432: {exc}")
    name = f"heald_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def replicas(mosquitto: Broker, pg_url: str, tmp_path: Path) -> Iterator[list[CoordinatorProcess]]:
    procs = []
    for i in (1, 2):
        port = free_port()
        cfg = write_config(
            tmp_path / f"r{i}",
            mqtt_port=mosquitto.port,
            web_port=port,
            store_url=pg_url,
            share_group="coordinators",
            replica_id=f"replica-{i}",
        )
        # both replicas sign with the same key (as a real deployment would share it)
        procs.append(CoordinatorProcess(cfg, port))
    procs[0].start()
    (tmp_path / "r2" / "state").mkdir(parents=True)
    (tmp_path / "r2" / "state" / "command-key.pem").write_bytes(
        (tmp_path / "r1" / "state" / "command-key.pem").read_bytes()
    )
    procs[1].start()
    yield procs
    for p in procs:
        p.stop()


NODES = 40
ROUNDS = 10


async def traffic(port: int) -> int:
    """Publish births, statuses, metrics, risk, events and actions; resend 1 in 5. Returns unique count."""
    nodes = [SimNode(f"rep-{i:02d}", site="a" if i % 2 else "b") for i in range(NODES)]
    unique = 0
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for n in nodes:
            await publish(client, n.birth())
            await publish(client, n.status())
            unique += 2
        for r in range(ROUNDS):
            for n in nodes:
                batch = [
                    n.metrics(3),
                    n.risk(0.1 * r),
                    n.event("sim.tick"),
                    n.action(f"run{r}", "pb", "started"),
                ]
                for m in batch:
                    await publish(client, m)
                    unique += 1
                    if (m.seq % 5) == 0:  # a QoS 1 redelivery / spool replay: same (node, seq)
                        await publish(client, m)
    await asyncio.sleep(0.1)
    return unique


def test_exactly_once_across_replicas(replicas: list[CoordinatorProcess], mosquitto: Broker) -> None:
    unique = asyncio.run(traffic(mosquitto.port))

    def settled(_: CoordinatorProcess) -> object:
        infos = [r.api("GET", "/api/info")[1] for r in replicas]
        processed = sum(i["ingest"]["processed"] for i in infos)
        queued = sum(i["ingest"]["queue_depth"] for i in infos)
        return processed >= unique and queued == 0 and infos

    infos = replicas[0].wait_for(settled, timeout=60)
    processed = [i["ingest"]["processed"] for i in infos]
    assert sum(processed) == unique  # exactly once in total
    assert all(p > 0 for p in processed), processed  # the shared subscription split the work
    # metrics are QoS 0 and every kind is deduplicated: nothing counted twice anywhere
    counts = infos[0]["counts"]
    assert counts["nodes"] == NODES
    assert counts["metrics"] == NODES * ROUNDS
    assert counts["risk"] == NODES * ROUNDS
    assert counts["events"] == NODES * ROUNDS
    assert counts["actions"] == NODES * ROUNDS
    assert counts["presence"] == NODES * 2
    duplicates = sum(i["ingest"]["duplicates"] for i in infos)
    assert duplicates > 0  # resent messages and the retained presence seen by both replicas
    assert sum(i["ingest"]["malformed_total"] for i in infos) == 0

    # the dashboard API answers the same from either replica (state lives in PostgreSQL)
    views = [r.api("GET", "/api/nodes?limit=500&sort=node&order=asc")[1] for r in replicas]
    assert views[0]["items"] == views[1]["items"]
    assert views[0]["total"] == NODES
    assert {i["replica"] for i in infos} == {"replica-1", "replica-2"}
