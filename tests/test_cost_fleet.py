"""The coordinator's side of cost transparency: the ``cost`` table (exactly once, like every
report), the schema 2 -> 3 migration, and the fleet roll-up behind ``/api/cost`` and
``heald fleet cost`` (per day, this week against the one before, top wasters)."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from test_coordinator_store import BUDGET, inc, pg_admin, pg_url, store_url  # noqa: F401 - fixtures

from agent import wire
from coordinator.config import StoreSection
from coordinator.store import Store, open_store
from coordinator.store.schema import SCHEMA_VERSION

DAY = 86400.0


def cost(node: str, seq: int, end: float, **amounts: float) -> wire.Cost:
    return wire.Cost(v=1, node=node, site="s1", seq=seq, ts=end, start=end - 3600, end=end,
                     node_class="gpu" if node.startswith("g") else "cpu", **amounts)


@pytest_asyncio.fixture
async def store(store_url: str) -> AsyncIterator[Store]:  # noqa: F811 - the imported fixture's name
    s = await open_store(store_url, StoreSection(), BUDGET, replica="t")
    yield s
    await s.close()


@pytest.mark.asyncio
async def test_cost_summaries_are_stored_once_and_rolled_up_per_day_week_and_node(store: Store) -> None:
    now = time.time()
    today = math.floor(now / DAY) * DAY + 60  # a minute into today (UTC)
    msgs = [
        cost("g1", 1, today, idle_gpu_h=3.0, idle_core_h=1.0, money=6.0, energy_kwh=0.5),
        cost("g1", 2, today - DAY, idle_gpu_h=2.0, money=4.0),
        cost("c1", 1, today, idle_core_h=10.0, mem_stranded_gib_h=64.0),
        cost("c1", 2, today - 9 * DAY, idle_core_h=5.0),  # the week before
        cost("c2", 1, today - 30 * DAY, idle_core_h=99.0),  # out of the window
    ]
    first = await store.apply([inc(m) for m in msgs])
    again = await store.apply([inc(m) for m in msgs])
    assert (first.new, again.new, again.duplicates) == (5, 0, 5)
    data = await store.fleet_cost(days=14, top=10)
    assert data["today"]["idle_gpu_h"] == pytest.approx(3.0)
    assert data["today"]["idle_core_h"] == pytest.approx(11.0)
    assert data["week"]["idle_gpu_h"] == pytest.approx(5.0)
    assert data["week"]["money"] == pytest.approx(10.0)
    assert data["previous_week"]["idle_core_h"] == pytest.approx(5.0)
    assert data["trend"]["idle_core_h"] == pytest.approx((11.0 - 5.0) / 5.0)
    assert data["trend"]["idle_gpu_h"] is None  # nothing the week before: no trend
    assert [n["node"] for n in data["top"]] == ["g1", "c1"]  # money first, then idle hours
    assert data["top"][0]["node_class"] == "gpu"
    assert data["nodes"] == 2
    assert [d["day"] for d in data["days"]] == [today - 60 - 9 * DAY, today - 60 - DAY, today - 60]
    assert sum(d["idle_core_h"] for d in data["days"]) == pytest.approx(16.0)


def test_a_schema_2_store_is_migrated_to_the_current_one_with_the_cost_table(tmp_path: Path) -> None:
    import asyncio  # noqa: PLC0415

    db = tmp_path / "c.db"

    async def open_close() -> None:
        s = await open_store(f"sqlite:///{db}", StoreSection(), BUDGET)
        await s.close()

    asyncio.run(open_close())
    with sqlite3.connect(db) as conn:  # make it a version 2 store: no cost table
        conn.execute("DROP TABLE cost")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    asyncio.run(open_close())
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        assert version == str(SCHEMA_VERSION) == "4"
        assert conn.execute("SELECT COUNT(*) FROM cost").fetchone()[0] == 0


def test_fleet_cost_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli.main import main  # noqa: PLC0415

    base = ["fleet", "--url", "http://127.0.0.1:9", "--token", "t", "cost"]
    assert main([*base, "--days", "0"]) == 2  # bad input: one line, no traceback
    err = capsys.readouterr().err
    assert "--days must be 1..366" in err
    assert "Traceback" not in err
    assert main(base) == 1  # nothing listens on port 9: the coordinator is unreachable
    assert "cannot reach the coordinator" in capsys.readouterr().err
