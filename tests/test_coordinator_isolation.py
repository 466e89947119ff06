"""One node's bad data never costs another node's (issue 18, item 1): at the store and at ingest.

In-process against a real store (SQLite, and PostgreSQL when it answers). The wire rejects what
it can (tests/test_wire_bounds.py); what passes the decoder and still fails the database — a
constraint, here injected with a trigger (SQLite) or a CHECK constraint (PostgreSQL), or a NUL in
a PostgreSQL string — is left out of its batch, which is stored without it, and counted per node.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from test_coordinator_store import BUDGET, PG_ADMIN, inc, pg_available

from agent import wire
from coordinator.config import MqttSection, StoreSection
from coordinator.ingest import Bus, explain, topic_node
from coordinator.model import BatchResult, Incoming
from coordinator.rejects import NO_NODE, OTHER, RejectTable
from coordinator.store import Store, open_store
from coordinator.store.database import is_data_error, pg_columns
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


POISON = "poison"  # an event name and a label key the database is made to refuse


async def poison(store: Store) -> None:
    """Make the database refuse events named ``poison`` (history insert) and a ``poison`` label
    (written while a birth is merged into its node: the state phase)."""
    if store.db.is_postgres:
        ddl = [f"ALTER TABLE events ADD CONSTRAINT no_poison CHECK (name <> '{POISON}')",
               f"ALTER TABLE node_labels ADD CONSTRAINT no_poison_label CHECK (key <> '{POISON}')"]
    else:
        ddl = [(f"CREATE TRIGGER no_poison BEFORE INSERT ON events WHEN NEW.name = '{POISON}' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned event'); END"),
               (f"CREATE TRIGGER no_poison_label BEFORE INSERT ON node_labels WHEN NEW.key = '{POISON}' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned label'); END")]

    def run(cur: Any) -> None:
        for stmt in ddl:
            cur.execute(stmt)

    await store.db.write(run)


async def rows(store: Store, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return await store.db.read(lambda cur: store.db.rows(cur, sql, params))


def mixed_batch() -> tuple[list[Incoming], set[tuple[str, int]], int]:
    """A healthy node's reports shuffled with a hostile node's: (batch, bad keys, good event count)."""
    good, bad = SimNode("good", labels={"rack": "r1"}), SimNode("bad", labels={POISON: "x"})
    batch = [inc(good.birth()), inc(good.metrics(3)), inc(good.risk(0.4))]
    batch += [inc(good.event("gpu.xid", {"gpu": str(i)}, value=float(i))) for i in range(200)]
    poisoned = [bad.birth(), *(bad.event(POISON) for _ in range(3))]  # the birth fails in the state phase
    batch += [inc(m) for m in poisoned]
    batch += [inc(bad.event("disk.readonly")) for _ in range(2)]
    random.Random(18).shuffle(batch)
    return batch, {(m.node, m.seq) for m in poisoned}, 200


@pytest.mark.asyncio
async def test_a_report_the_database_refuses_costs_its_batch_nothing(
    store: Store, caplog: pytest.LogCaptureFixture,
) -> None:
    await poison(store)
    batch, bad, good_events = mixed_batch()
    with caplog.at_level(logging.WARNING, logger="psycopg"):
        result = await store.apply(batch)
    assert not caplog.records  # no psycopg "pipeline aborted" warning per refused attempt
    assert {(r.node, r.seq) for r in result.rejected} == bad
    assert {r.kind for r in result.rejected} == {"birth", "event"}
    assert all(r.node == "bad" for r in result.rejected)
    assert any("poison" in r.error for r in result.rejected)
    assert (result.new, result.duplicates) == (len(batch) - len(bad), 0)
    # every report of the healthy node is stored, and its state is what it sent
    assert len(await rows(store, "SELECT seq FROM events WHERE node = ?", ("good",))) == good_events
    node = await store.get_node("good")
    assert node["labels"] == {"rack": "r1"}
    assert node["anomaly"] == 0.4
    assert len(await rows(store, "SELECT seq FROM metrics WHERE node = ?", ("good",))) == 1
    # the hostile node's good reports too: only the refused rows are missing
    assert len(await rows(store, "SELECT seq FROM events WHERE node = ?", ("bad",))) == 2
    assert await rows(store, "SELECT key FROM node_labels WHERE node = ?", ("bad",)) == []
    assert await rows(store, "SELECT seq FROM presence WHERE node = ?", ("bad",)) == []

    # delivered again (a QoS 1 redelivery): duplicates, and the refused ones refused again
    again = await store.apply(batch)
    assert (again.new, again.duplicates, len(again.rejected)) == (0, len(batch) - len(bad), len(bad))


@pytest.mark.asyncio
async def test_a_batch_of_only_refused_reports_stores_nothing_and_raises_nothing(store: Store) -> None:
    await poison(store)
    n = SimNode("bad")
    result = await store.apply([inc(n.event(POISON)) for _ in range(5)])
    assert (result.new, len(result.rejected)) == (0, 5)
    assert await rows(store, "SELECT seq FROM events") == []


@pytest.mark.asyncio
async def test_a_nul_in_a_string_is_isolated_where_the_database_refuses_it(store: Store) -> None:
    """PostgreSQL cannot store a NUL in a text column (psycopg.DataError); SQLite can."""
    good, bad = SimNode("good"), SimNode("bad")
    nul = bad.event("disk.readonly", {"mount": "/\x00"}, message="a\x00b")
    assert wire.decode(wire.encode(nul)) == nul  # valid on the wire
    batch = [inc(good.event("x")) for _ in range(50)] + [inc(nul)] + [inc(good.event("y")) for _ in range(50)]
    result = await store.apply(batch)
    if store.db.is_postgres:
        assert [(r.node, r.seq) for r in result.rejected] == [("bad", nul.seq)]
        assert "NUL" in result.rejected[0].error
        assert result.new == 100
    else:
        assert (result.new, result.rejected) == (101, [])
    assert len(await rows(store, "SELECT seq FROM events WHERE node = ?", ("good",))) == 100


def test_typed_columns_make_a_float_column_floats_and_refuse_nan_and_infinity() -> None:
    """PostgreSQL gets a batch as one typed array a column: a float column's ints become floats
    (psycopg dumps a list of one type), None stays NULL, and NaN or an infinity is a data error
    (the report that carries it is isolated), as the JSON encoding refused them before."""
    types = ["text", "bigint", "double precision"]
    assert pg_columns([("a", 1, 2), ("b", 2**40, None), ("c", 3, 2.5)], types) == [
        ["a", "b", "c"], [1, 2**40, 3], [2.0, None, 2.5]]
    assert all(type(v) is float for v in pg_columns([("a", 1, 2)], types)[2])
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="NaN or infinite") as err:
            pg_columns([("a", 1, 1.0), ("b", 2, bad)], types)
        assert is_data_error(err.value)
    assert pg_columns([], types) == [[], [], []]


def test_which_errors_are_data_errors() -> None:
    """A data error is isolated; anything else keeps the retry (a lock, a lost connection)."""
    assert is_data_error(sqlite3.IntegrityError("NOT NULL constraint failed: events.wall"))
    assert is_data_error(OverflowError("Python int too large to convert to SQLite INTEGER"))
    assert is_data_error(ValueError("bad value"))
    assert not is_data_error(sqlite3.OperationalError("database is locked"))
    assert not is_data_error(sqlite3.OperationalError("disk I/O error"))
    assert not is_data_error(RuntimeError("something else"))
    psycopg = pytest.importorskip("psycopg")
    assert is_data_error(psycopg.errors.NumericValueOutOfRange("bigint out of range"))
    assert is_data_error(psycopg.errors.CheckViolation("check"))
    assert is_data_error(psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"))
    assert not is_data_error(psycopg.OperationalError("connection lost"))
    assert not is_data_error(psycopg.errors.DeadlockDetected("deadlock"))
    assert not is_data_error(psycopg.errors.AdminShutdown("terminating connection"))


@pytest.mark.asyncio
async def test_the_bus_counts_refused_reports_per_node_and_commits_the_rest(store: Store) -> None:
    await poison(store)
    results: list[BatchResult] = []

    async def after(result: BatchResult) -> None:
        results.append(result)

    bus = Bus(MqttSection(), host="127.0.0.1", port=1, client_id="t", apply=store.apply, after_batch=after,
              batch_max=2000, batch_interval_s=0.05, queue_max=100)
    batch, bad, _ = mixed_batch()
    await bus._commit(batch)
    stats = bus.stats.as_dict()
    assert stats["processed"] == len(batch) - len(bad)
    assert (stats["dropped_batches"], stats["store_errors"]) == (0, 0)
    assert stats["store_rejected"] == len(bad)
    assert stats["rejected"]["nodes"] == {"bad": {"total": len(bad), "store": len(bad)}}
    assert len(results) == 1


# ------------------------------------------------------------------ rejections per node, bounded
def test_reject_table_names_the_nodes_that_keep_failing_in_bounded_memory() -> None:
    table = RejectTable()  # 1000 nodes at most
    for i in range(100_000):  # a flood of invented names, and one real node failing now and then
        table.add(f"junk-{i}", "decode")
        if i % 100 == 0:
            table.add("real", "store")
    out = table.as_dict()
    assert out["tracked"] <= 1000
    assert out["nodes"]["real"] == {"total": 1000, "store": 1000}  # named, counted exactly
    assert next(iter(out["nodes"])) == "real"  # most rejections first
    assert out["total"] == 101_000 == sum(v["total"] for v in out["nodes"].values()) + out["other"]["total"]
    assert out["by_reason"] == {"decode": 100_000, "store": 1000}
    assert OTHER not in out["nodes"]
    table.add(None, "topic")
    assert table.as_dict()["nodes"][NO_NODE] == {"total": 1, "topic": 1}


def test_reject_table_logs_once_per_node_per_interval_and_caps_the_lines() -> None:
    now = [1000.0]
    table = RejectTable(max_nodes=10, log_interval_s=60.0, log_lines=3, clock=lambda: now[0])
    assert table.add("a", "decode") == 0  # the first: logged
    assert table.add("a", "decode") is None
    assert table.add("a", "decode") is None
    assert table.add("b", "decode") == 0
    assert table.add("c", "decode") == 0
    assert table.add("d", "decode") is None  # the cap: 3 lines a minute
    assert table.as_dict()["log_lines_suppressed"] == 1
    now[0] += 61
    assert table.add("a", "store") == 2  # says how many were not logged since its last line
    assert table.add("d", "decode") == 1


def test_topic_node_and_explain() -> None:
    assert topic_node("heald/v1/lab/n1/event") == "n1"
    assert topic_node("heald/v1/lab/a/b/c") is None
    assert topic_node("x" * 70_000) is None
    n = SimNode("n1", site="lab")
    doc = msgspec.to_builtins(n.event("x"))
    doc["wall"] = float("nan")
    payload = msgspec.msgpack.encode(doc)
    assert "`$.wall`" in explain("heald/v1/lab/n1/event", payload, 1 << 20)
    other = wire.encode(SimNode("n2", site="lab").event("x"))
    assert "node 'n2'" in explain("heald/v1/lab/n1/event", other, 1 << 20)
    assert "exceeds" in explain("heald/v1/lab/n1/event", other, 10)
