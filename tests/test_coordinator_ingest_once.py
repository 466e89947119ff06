"""What a node reports about its playbooks, stored once and shown as it is: one escalation per
(node, playbook, run) however often it arrives, and a denied approval as a refused action.

In-process against the store (SQLite, and PostgreSQL when it answers), with the messages the
agent's own report stage builds (:func:`agent.report.build.playbook_record` / ``playbook_event``).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from test_coordinator_store import BUDGET, PG_ADMIN, inc, pg_available

from agent import wire
from agent.report.build import playbook_event, playbook_record
from coordinator.config import StoreSection
from coordinator.store import Store, open_store
from devtools.fleet_sim import SimNode


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'c.db'}"
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


@pytest_asyncio.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = await open_store(store_url, StoreSection(), BUDGET, replica="t")
    yield s
    await s.close()


def stamped(message: wire.Event | wire.Action, node: SimNode) -> Any:
    """A report-stage message with the envelope the reporter would stamp: node, site, next seq."""
    env = node._env()  # the simulator's envelope: the next seq of this node
    return msgspec.structs.replace(message, node=env["node"], site=env["site"], seq=env["seq"])


def escalation(run_id: str, playbook: str = "disk-nearly-full") -> dict[str, Any]:
    """The engine's escalation (agent/act/runner.py ``_escalate``) for one run."""
    return {
        "kind": "playbook.escalated",
        "severity": "critical",
        "playbook": playbook,
        "run_id": run_id,
        "message": f"{playbook}: every step ran and the problem persists",
        "labels": {"mount": "/"},
        "inputs": {},
    }


async def node_escalations(store: Store, node: str) -> list[dict[str, Any]]:
    rows = await store.table("escalations", where="scope = 'node' AND node = ?", params=[node], order="id")
    return [dict(r) for r in rows]


@pytest.mark.asyncio
async def test_one_escalation_per_node_playbook_run(store: Store) -> None:
    n = SimNode("n1", labels={"rack": "r1"})
    await store.apply([inc(n.birth())])
    esc = escalation("r1")
    # the same run's escalation under two seqs: the event, and the audit record as a 0.1.0 agent
    # also publishes it (an event of the same name and labels)
    as_event = stamped(playbook_event({"node": "n1", "wall": 1000.0, **esc}), n)
    as_record = n.event(
        "playbook.escalated",
        {"mount": "/", "playbook": "disk-nearly-full", "run_id": "r1", "severity": "critical"},
        message=esc["message"],
    )
    assert isinstance(as_event, wire.Event)
    assert as_event.name == as_record.name
    assert as_event.seq != as_record.seq
    first = await store.apply([inc(as_record), inc(as_event)])  # both in one batch
    assert (first.new, first.duplicates) == (2, 0)  # two reports (both in the events history) ...
    rows = await node_escalations(store, "n1")
    assert len(rows) == 1  # ... one escalation
    assert (rows[0]["playbook"], rows[0]["state"]) == ("disk-nearly-full", "open")
    assert rows[0]["reason"] == esc["message"]

    # again in a later batch, and a redelivery of the first (same seq: the (node, seq) dedupe)
    again = stamped(playbook_event({"node": "n1", "wall": 1001.0, **esc}), n)
    later = await store.apply([inc(again), inc(as_record)])
    assert (later.new, later.duplicates) == (1, 1)
    assert len(await node_escalations(store, "n1")) == 1

    # resolved, then the same run's escalation once more: it stays resolved, no second row
    await store.resolve_escalation(int(rows[0]["id"]), "op")
    await store.apply([inc(stamped(playbook_event({"node": "n1", "wall": 1002.0, **esc}), n))])
    rows = await node_escalations(store, "n1")
    assert [r["state"] for r in rows] == ["resolved"]

    # another run of the same playbook, and the same run id on another node: their own rows
    other = SimNode("n2")
    await store.apply(
        [
            inc(stamped(playbook_event({"node": "n1", "wall": 1003.0, **escalation("r2")}), n)),
            inc(other.birth()),
            inc(stamped(playbook_event({"node": "n2", "wall": 1003.0, **esc}), other)),
        ]
    )
    assert [(r["state"]) for r in await node_escalations(store, "n1")] == ["resolved", "open"]
    assert len(await node_escalations(store, "n2")) == 1
    open_rows = await store.table("escalations", where="state = 'open'")
    assert len(open_rows) == 2


@pytest.mark.asyncio
async def test_escalations_without_a_run_id_are_each_stored(store: Store) -> None:
    n = SimNode("n1")
    await store.apply(
        [
            inc(n.birth()),
            inc(n.event("escalation", {"playbook": "pb"}, message="a human, please")),
            inc(n.event("escalation", {"playbook": "pb"}, message="a human, please")),
            inc(n.event("playbook.escalated", {"playbook": "pb", "run_id": "-"}, message="no run")),
        ]
    )
    assert len(await node_escalations(store, "n1")) == 3


@pytest.mark.asyncio
async def test_a_denied_approval_shows_as_a_refused_action(store: Store) -> None:
    n = SimNode("n1")
    await store.apply(
        [
            inc(n.birth()),
            inc(n.event("approval_request", {"request_id": "a1", "run_id": "a1", "playbook": "runaway-cpu"})),
        ]
    )
    # the record the engine writes when an operator's deny reaches it
    record = {"type": "approval.denied", "node": "n1", "playbook": "runaway-cpu", "by": "op@10.0.0.1",
              "bindings": {"pid": 4242}, "audit_seq": 7, "audit_hash": "ab12"}
    denied = stamped(playbook_record(record), n)
    assert isinstance(denied, wire.Action)
    assert wire.decode(wire.encode(denied)) == denied
    await store.apply([inc(denied)])
    node = await store.get_node("n1")
    (action,) = node["actions"]
    assert (action["playbook"], action["action"], action["step"]) == ("runaway-cpu", "approval.denied",
                                                                      "approval.denied")
    assert (action["phase"], action["outcome"], action["error"]) == ("finished", "refused", "")
    assert action["result"]["by"] == "op@10.0.0.1"
    assert action["result"]["bindings.pid"] == 4242
    assert node["last_action"] == "runaway-cpu/approval.denied: refused"
    listed = await store.table("actions", where="node = ?", params=["n1"])
    assert [a["outcome"] for a in listed] == ["refused"]
