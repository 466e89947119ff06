"""The coordinator's side of demand forecasts: the demand summaries stored with the cost summaries
(schema 4, and the 3 -> 4 migration), the per-site and fleet roll-up behind ``/api/demand``, and
``heald fleet demand``."""

from __future__ import annotations

import asyncio
import json
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
from coordinator.store.cost import AMOUNTS
from coordinator.store.schema import SCHEMA_VERSION

H = 3600.0


def cost(node: str, site: str, seq: int, end: float, *demand: wire.DemandSummary) -> wire.Cost:
    return wire.Cost(v=1, node=node, site=site, seq=seq, ts=end, start=end - H, end=end, idle_core_h=1.0,
                     demand=list(demand))


def d(resource: str, actual: float | None, predicted: float | None = None,
      point: tuple[float, ...] = ()) -> wire.DemandSummary:
    if not point:
        return wire.DemandSummary(resource=resource, actual=actual, predicted=predicted)
    return wire.DemandSummary(resource=resource, actual=actual, predicted=predicted, step_s=H,
                              point=list(point), lo=[p - 1 for p in point], hi=[p + 1 for p in point])


@pytest_asyncio.fixture
async def store(store_url: str) -> AsyncIterator[Store]:  # noqa: F811 - the imported fixture's name
    s = await open_store(store_url, StoreSection(), BUDGET, replica="t")
    yield s
    await s.close()


@pytest.mark.asyncio
async def test_demand_is_rolled_up_per_site_and_fleet(store: Store) -> None:
    now = time.time()
    b0 = math.floor(now / H) * H - 2 * H  # two full hours ago
    msgs = [
        # site a: two nodes; cpu averaged, network summed over interfaces and nodes
        cost("a1", "a", 1, b0 + 60, d("cpu.util_pct", 20.0), d("net.rx_bytes_per_s[eth0]", 100.0),
             d("net.rx_bytes_per_s[eth1]", 50.0)),
        cost("a1", "a", 2, b0 + H + 60, d("cpu.util_pct", 40.0, 30.0, (50.0, 60.0)),
             d("net.rx_bytes_per_s[eth0]", 200.0, 100.0, (300.0, 300.0))),
        cost("a2", "a", 1, b0 + 60, d("cpu.util_pct", 60.0)),
        cost("a2", "a", 2, b0 + H + 60, d("cpu.util_pct", 80.0, 90.0, (70.0, 80.0))),
        # site b: one node, its bucket has two periods (averaged first)
        cost("b1", "b", 1, b0 + H + 10, d("cpu.util_pct", 10.0)),
        cost("b1", "b", 2, b0 + H + 20, d("cpu.util_pct", 30.0, 20.0, (5.0,))),
        cost("c1", "c", 1, b0 + H + 60),  # no demand part (an older agent): not counted
    ]
    assert (await store.apply([inc(m) for m in msgs])).new == len(msgs)
    data = await store.fleet_demand(hours=48, bucket_s=3600)
    by_site = {s["site"]: s for s in data["sites"]}
    assert set(by_site) == {"a", "b"}
    a = {r["resource"]: r for r in by_site["a"]["resources"]}
    assert by_site["a"]["nodes"] == 2
    assert a["cpu.util_pct"]["agg"] == "mean"
    assert a["net.rx_bytes_per_s"]["agg"] == "sum"
    assert a["cpu.util_pct"]["actual"] == [[b0, 40.0], [b0 + H, 60.0]]
    assert a["cpu.util_pct"]["predicted"] == [[b0 + H, 60.0]]
    assert a["cpu.util_pct"]["mae"] == 0.0
    assert a["net.rx_bytes_per_s"]["actual"] == [[b0, 150.0], [b0 + H, 200.0]]
    assert a["net.rx_bytes_per_s"]["error_pct"] == pytest.approx(50.0)
    fc = a["cpu.util_pct"]["forecast"]
    assert fc["t"] == [b0 + 2 * H, b0 + 3 * H]
    assert fc["point"] == [60.0, 70.0]
    assert fc["lo"] == [59.0, 69.0]
    assert a["net.rx_bytes_per_s"]["forecast"]["point"] == [300.0, 300.0]
    b = {r["resource"]: r for r in by_site["b"]["resources"]}
    assert b["cpu.util_pct"]["actual"] == [[b0 + H, 20.0]]
    assert b["cpu.util_pct"]["predicted"] == [[b0 + H, 20.0]]
    fleet = {r["resource"]: r for r in data["fleet"]["resources"]}
    assert data["fleet"]["nodes"] == 3
    assert fleet["cpu.util_pct"]["actual"] == [[b0, 40.0], [b0 + H, pytest.approx(140.0 / 3)]]
    # the fleet's forecast: the steps every node's latest forecast covers (b1's is one step long)
    assert fleet["cpu.util_pct"]["forecast"]["t"] == [b0 + 2 * H]
    assert fleet["cpu.util_pct"]["forecast"]["point"] == [pytest.approx((50.0 + 70.0 + 5.0) / 3)]


@pytest.mark.asyncio
async def test_hostile_demand_json_in_the_store_is_skipped(store: Store) -> None:
    now = time.time()
    await store.apply([inc(cost("n1", "s", 1, now, d("cpu.util_pct", 5.0)))])
    cols = ", ".join(("node", "seq", "ts", "start_ts", "end_ts", "node_class", "currency", *AMOUNTS,
                      "demand", "demand_forecast"))
    marks = ", ".join("?" * (9 + len(AMOUNTS)))
    sql = f"INSERT INTO cost ({cols}) VALUES ({marks})"  # noqa: S608
    junk = json.dumps([1, ["x"], [5, 1, 2], ["y", "NaN", {}], {"resource": "z"}])
    bad_fc = json.dumps([1, {"resource": "w", "step_s": 10, "point": "no", "lo": [], "hi": []},
                         {"resource": "v", "step_s": -1, "point": [1], "lo": [1], "hi": [1]}])
    for seq, text, fc in ((2, junk, bad_fc), (3, "{", "{"), (4, '{"resource": "y"}', "[]")):
        row = ("n1", seq, now + seq, now - 1, now + seq, "", "", *([0.0] * len(AMOUNTS)), text, fc)
        await store.db.write(lambda cur, r=row: store.db.execute(cur, sql, r))
    data = await store.fleet_demand()
    res = {r["resource"]: r for r in data["fleet"]["resources"]}
    assert set(res) == {"cpu.util_pct"}


def test_a_schema_3_store_gets_the_demand_column(tmp_path: Path) -> None:
    db = tmp_path / "c.db"

    async def open_close() -> None:
        s = await open_store(f"sqlite:///{db}", StoreSection(), BUDGET)
        await s.close()

    asyncio.run(open_close())
    with sqlite3.connect(db) as conn:  # make it a version 3 store: a cost table without demand
        conn.execute("DROP TABLE cost")
        amounts = ", ".join(f"{a} DOUBLE PRECISION NOT NULL" for a in AMOUNTS)
        conn.execute("CREATE TABLE cost (node TEXT NOT NULL, seq BIGINT NOT NULL, "
                     "ts DOUBLE PRECISION NOT NULL, start_ts DOUBLE PRECISION NOT NULL, "
                     "end_ts DOUBLE PRECISION NOT NULL, "
                     f"node_class TEXT NOT NULL, currency TEXT NOT NULL, {amounts}, PRIMARY KEY (node, seq))")
        conn.execute(f"INSERT INTO cost VALUES ('old', 1, 1, 0, 1, '', ''{', 0' * len(AMOUNTS)})")  # noqa: S608
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    asyncio.run(open_close())
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        assert version == str(SCHEMA_VERSION) == "4"
        row = conn.execute("SELECT demand, demand_forecast FROM cost WHERE node = 'old'").fetchone()
        assert row == ("[]", "")


def test_fleet_demand_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli.main import main  # noqa: PLC0415

    base = ["fleet", "--url", "http://127.0.0.1:9", "--token", "t", "demand"]
    assert main([*base, "--hours", "0"]) == 2
    err = capsys.readouterr().err
    assert "--hours must be 1..1440" in err
    assert "Traceback" not in err
    assert main(base) == 1  # nothing listens on port 9
    assert "cannot reach the coordinator" in capsys.readouterr().err
