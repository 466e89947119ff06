"""The coordinator store, in-process: dedupe, ordering, state, leases, storm, retention.

Every test runs against SQLite and, when PostgreSQL answers on 127.0.0.1, against a fresh
database created for the test and dropped after it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio

from agent.wire import encode
from coordinator.config import BudgetSection, StoreSection
from coordinator.ingest import classify, subscription_qos, subscriptions
from coordinator.model import Incoming
from coordinator.store import NodeQuery, Store, open_store
from devtools.fleet_sim import SimNode

PG_ADMIN = "postgresql://postgres@127.0.0.1/postgres"


def pg_available() -> bool:
    try:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(PG_ADMIN, connect_timeout=2):
            return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


@pytest.fixture(scope="session")
def pg_admin() -> str:
    if not pg_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (postgres user, trust auth)")
    return PG_ADMIN


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    import psycopg  # noqa: PLC0415

    name = f"heald_test_{secrets.token_hex(6)}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1/{name}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


BUDGET = BudgetSection(
    max_nodes=2, max_percent=50, storm_share=0.2, storm_min_nodes=3, storm_window_s=300, lease_ttl_s=60
)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest_asyncio.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = await open_store(store_url, StoreSection(metrics_retention_s=3600), BUDGET, replica="t")
    yield s
    await s.close()


def inc(message: object, received_at: float | None = None) -> Incoming:
    from agent.wire import kind_of  # noqa: PLC0415

    return Incoming(message=message, kind=kind_of(message), received_at=received_at or time.time())  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_dedupe_by_node_seq(store: Store) -> None:
    n = SimNode("n1")
    msgs = [n.birth(), n.status(), n.metrics(5), n.risk(0.3), n.event("gpu.xid")]
    first = await store.apply([inc(m) for m in msgs])
    assert (first.new, first.duplicates) == (5, 0)
    again = await store.apply([inc(m) for m in msgs] + [inc(msgs[2])])
    assert (again.new, again.duplicates) == (0, 6)
    counts = await store.counts()
    assert counts["metrics"] == 1
    assert counts["events"] == 1
    assert counts["presence"] == 2


@pytest.mark.asyncio
async def test_batches_committed_at_once_store_every_report_and_end_on_the_newest(store: Store) -> None:
    """PostgreSQL commits up to ``writers`` batches at once (the default, 2): batches that share
    nodes, in flight together, store every report once, with no deadlock surfacing, and every
    node's state ends on its newest report whichever batch committed first."""
    nodes = [SimNode(f"n{i:03d}") for i in range(60)]
    await store.apply([inc(n.birth()) for n in nodes])
    batches: list[list[Incoming]] = [[] for _ in range(6)]
    for round_ in range(12):  # each node's reports spread over every batch, in turn
        for i, n in enumerate(nodes):
            batches[(round_ + i) % 6].append(inc(n.risk(round(0.1 * round_ + i / 1000, 4))))
            batches[(round_ + i + 3) % 6].append(inc(n.metrics(1)))
    assert store.db.writers == (2 if store.db.is_postgres else 1)
    results = await asyncio.gather(*(store.apply(b) for b in batches))
    assert sum(r.new for r in results) == 60 * 24
    assert not any(r.rejected or r.duplicates for r in results)
    counts = await store.counts()
    assert (counts["risk"], counts["metrics"]) == (60 * 12, 60 * 12)
    for i, n in enumerate(nodes):
        node = await store.get_node(n.node)
        assert node["anomaly"] == round(1.1 + i / 1000, 4), n.node


@pytest.mark.asyncio
async def test_late_replay_does_not_roll_back_state(store: Store) -> None:
    n = SimNode("n1")
    await store.apply([inc(n.birth()), inc(n.status())])
    old = n.risk(1.5)  # built first (lower seq), delivered last (a spool replay)
    new = n.risk(0.2)
    await store.apply([inc(new)])
    await store.apply([inc(old)])
    node = await store.get_node("n1")
    assert node["anomaly"] == 0.2
    assert not node["alert"]
    history = await store.node_risk("n1", 0)
    assert [r["anomaly"] for r in history] == [1.5, 0.2]  # both kept, in time order


@pytest.mark.asyncio
async def test_batch_applied_in_seq_order(store: Store) -> None:
    n = SimNode("n1")
    a, b = n.risk(1.4), n.risk(0.1)
    await store.apply([inc(b), inc(a)])  # arrives reversed in one batch
    assert (await store.get_node("n1"))["anomaly"] == 0.1


@pytest.mark.asyncio
async def test_presence_will_and_rebirth(store: Store) -> None:
    n = SimNode("n1")
    will = n.status("offline", "connection lost")  # built at connect time: lower seq than what follows
    await store.apply([inc(n.birth()), inc(n.status())])
    # the broker publishes the will: same bdseq, lower seq -> still wins (offline ends the session)
    will = msgspec.structs.replace(will, bdseq=n.bdseq)
    await store.apply([inc(will)])
    assert not (await store.get_node("n1"))["online"]
    # an old online from the same session arriving late does not resurrect the node
    await store.apply([inc(msgspec.structs.replace(n.status(), bdseq=n.bdseq))])
    assert not (await store.get_node("n1"))["online"]
    # a new session (bdseq + 1) does
    await store.apply([inc(n.birth()), inc(n.status())])
    node = await store.get_node("n1")
    assert node["online"]
    assert node["bdseq"] == 2


@pytest.mark.asyncio
async def test_incidents_approvals_escalations_acks(store: Store) -> None:
    n = SimNode("n1", labels={"rack": "r7"})
    await store.apply([inc(n.birth()), inc(n.risk(1.8))])
    node = await store.get_node("n1")
    assert node["open_incidents"] == 1
    assert node["labels"] == {"rack": "r7"}
    await store.apply(
        [
            inc(n.event("approval_request", {"request_id": "n1-ap1", "run_id": "run1", "playbook": "pb",
                                             "target": "pb", "acts_on": "stop_process: x (pid 7)"})),
            inc(n.event("playbook.escalated", {"playbook": "pb"}, message="gave up")),
            inc(n.action("run1", "pb", "started")),
            inc(n.action("run1", "pb", "finished", "failed")),
            inc(n.risk(0.1)),
        ]
    )
    node = await store.get_node("n1")
    assert node["open_incidents"] == 0
    assert node["incidents"][0]["closed_at"] is not None
    assert node["last_action"] == "pb/restart_service: failed"
    assert [a["id"] for a in node["approvals"]] == ["n1-ap1"]
    assert node["escalations"][0]["reason"] == "gave up"
    assert node["escalations"][0]["scope"] == "node"
    # the approval's target from its request's labels; the open escalation in the fleet list
    assert node["approvals"][0]["target"] == "stop_process: x (pid 7)"
    assert [a["target"] for a in await store.table("approvals")] == ["stop_process: x (pid 7)"]
    listed = (await store.list_nodes(NodeQuery()))["items"][0]
    assert (listed["open_escalations"], listed["escalation"]) == (1, "gave up")


@pytest.mark.asyncio
async def test_node_listing_filters_sort_paging(store: Store) -> None:
    batch = []
    for i in range(30):
        n = SimNode(f"node-{i:02d}", site="a" if i % 2 else "b", labels={"rack": f"r{i % 3}"})
        batch += [inc(n.birth()), inc(n.status()), inc(n.risk(i / 10))]
    await store.apply(batch)
    page = await store.list_nodes(NodeQuery(limit=10))
    assert page["total"] == 30
    assert [x["node"] for x in page["items"][:2]] == ["node-29", "node-28"]  # riskiest first
    page2 = await store.list_nodes(NodeQuery(limit=10, offset=10))
    assert page2["items"][0]["node"] == "node-19"
    only_a = await store.list_nodes(NodeQuery(site="a", limit=100))
    assert only_a["total"] == 15
    assert all(x["site"] == "a" for x in only_a["items"])
    rack = await store.list_nodes(NodeQuery(label=("rack", "r1"), sort="node", descending=False, limit=100))
    assert [x["node"] for x in rack["items"]][:3] == ["node-01", "node-04", "node-07"]
    alert = await store.list_nodes(NodeQuery(state="alert", limit=100))
    assert alert["total"] == 20  # anomaly >= 1.0 for i >= 10
    found = await store.list_nodes(NodeQuery(q="DE-2", limit=100))
    assert found["total"] == 10
    assert page["sites"] == ["a", "b"]
    assert page["fleet"] == {"nodes": 30, "online": 30, "alert": 20, "escalations": 0}


async def _fleet(store: Store, count: int, site: str = "s") -> list[SimNode]:
    nodes = [SimNode(f"{site}-{i:03d}", site=site) for i in range(count)]
    await store.apply([inc(n.birth()) for n in nodes])
    return nodes


async def _request(store: Store, node: SimNode, playbook: str = "restart-nginx") -> object:
    ev = node.event("lease_request", {"request_id": f"r-{node.node}", "playbook": playbook}, value=30)
    result = await store.apply([inc(ev)])
    return await store.decide_leases(result.lease_requests)


@pytest.mark.asyncio
async def test_lease_budget_and_expiry(store: Store) -> None:
    nodes = await _fleet(store, 10)  # max(1, min(2, 50% of 10)) = 2
    granted = []
    for n in nodes[:2]:
        out = await _request(store, n, "pb-a")
        granted.append(out.decisions[0].granted)  # type: ignore[attr-defined]
    assert granted == [True, True]
    third = await _request(store, nodes[2], "pb-b")
    d = third.decisions[0]  # type: ignore[attr-defined]
    assert not d.granted
    assert d.reason.startswith("budget:")
    # leases expire -> budget returns
    expired = time.time() - 1
    await store.db.write(lambda cur: store.db.execute(cur, "UPDATE leases SET expires_at = ?", (expired,)))
    again = await _request(store, nodes[3], "pb-c")
    assert again.decisions[0].granted  # type: ignore[attr-defined]
    # releasing returns budget too
    lease_id = again.decisions[0].lease_id  # type: ignore[attr-defined]
    await store.apply([inc(nodes[3].event("lease_release", {"lease_id": lease_id}))])
    leases = await store.table("leases", where="id = ?", params=[lease_id])
    assert leases[0]["released_at"] is not None


@pytest.mark.asyncio
async def test_storm_holds_group_and_raises_one_escalation(store: Store) -> None:
    nodes = await _fleet(store, 20)  # storm when > 20% (4 nodes) and >= 3 distinct
    other_site = await _fleet(store, 5, site="t")
    results = [await _request(store, n) for n in nodes]
    decisions = [r.decisions[0] for r in results]  # type: ignore[attr-defined]
    assert sum(d.granted for d in decisions) == 2
    storm_at = next(i for i, d in enumerate(decisions) if d.reason.startswith("storm"))
    assert storm_at == 4  # the 5th distinct node crosses 20% of 20
    assert all(not d.granted for d in decisions[storm_at:])
    assert all(d.reason.startswith("held") for d in decisions[storm_at + 1 :])
    revoked = results[storm_at].revocations  # type: ignore[attr-defined]
    assert len(revoked) == 2  # the two granted leases are revoked by the hold
    escalations = await store.table("escalations", where="scope = 'fleet'")
    assert len(escalations) == 1
    assert escalations[0]["grp"] == "site:s"
    assert len(escalations[0]["nodes"]) == 5
    # another group is not held
    assert (await _request(store, other_site[0])).decisions[0].granted  # type: ignore[attr-defined]
    # resolving the escalation lifts the hold (the budget applies again)
    await store.resolve_escalation(int(escalations[0]["id"]), "op")
    await store.db.write(lambda cur: store.db.execute(cur, "DELETE FROM lease_requests"))
    assert (await _request(store, nodes[0])).decisions[0].granted  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_retention_prunes_metrics(store: Store) -> None:
    n = SimNode("n1")
    old = n.metrics(3)
    old = msgspec.structs.replace(
        old, samples=[msgspec.structs.replace(s, wall=s.wall - 7200) for s in old.samples]
    )
    await store.apply([inc(old), inc(n.metrics(3))])
    removed = await store.prune()
    assert removed["metrics"] == 1
    assert (await store.counts())["metrics"] == 1
    series = await store.node_metrics("n1", 0)
    assert len(series["samples"]) == 3
    assert "cpu.util" in series["names"]


@pytest.mark.asyncio
async def test_retention_caps_metrics_per_node_and_ages_out_risk(store_url: str) -> None:
    """The per-node cap keeps each node's newest rows (only the nodes over it lose any), and risk
    history goes by age, node by node: the pass that no longer sorts or scans whole tables still
    deletes exactly what it did."""
    store = await open_store(store_url, StoreSection(metrics_retention_s=3600, metrics_max_rows_per_node=10,
                                                     risk_retention_s=3600), BUDGET, replica="t")
    try:
        busy, quiet, old = SimNode("busy"), SimNode("quiet"), SimNode("old")
        reports = [busy.metrics(1) for _ in range(14)] + [quiet.metrics(1) for _ in range(4)]
        stale = old.risk(0.2)
        stale = msgspec.structs.replace(stale, ts=stale.ts - 7200)
        reports += [stale, old.risk(0.3), busy.risk(0.1)]
        await store.apply([inc(m) for m in reports])
        keep = sorted(m.seq for m in reports[:14])[-10:]
        removed = await store.prune()
        assert removed["metrics_cap"] == 4
        assert removed["metrics"] == 0
        assert removed["risk"] == 1
        rows = await store.db.read(lambda cur: store.db.rows(cur, "SELECT node, seq FROM metrics"))
        busy_left = sorted(r["seq"] for r in rows if r["node"] == "busy")
        assert len(busy_left) == 10
        assert [s & ((1 << 48) - 1) for s in busy_left] == keep  # the newest ten (stored as base + seq)
        assert len([r for r in rows if r["node"] == "quiet"]) == 4
        risk = await store.db.read(lambda cur: store.db.rows(cur, "SELECT node FROM risk"))
        assert sorted(r["node"] for r in risk) == ["busy", "old"]
        assert (await store.prune())["metrics_cap"] == 0  # at the cap: nothing more
    finally:
        await store.close()


def test_classify_counts_malformed() -> None:
    n = SimNode("n1", site="s1")
    good = encode(n.risk(0.5))
    now = time.time()
    assert isinstance(classify("heald/v1/s1/n1/risk", good, 1 << 20, now), Incoming)
    assert classify("heald/v1/s1/n1/risk", b"\xc1nonsense", 1 << 20, now) == "decode"
    assert classify("heald/v1/s1/n1/risk", good, 10, now) == "too_large"
    assert classify("heald/v1/s1/other/risk", good, 1 << 20, now) == "topic_mismatch"
    assert classify("heald/v1/s1/n1/metrics", good, 1 << 20, now) == "topic_mismatch"
    assert classify("heald/v2/s1/n1/risk", good, 1 << 20, now) == "topic"
    assert classify("heald/v1/s1/n1/cmd", good, 1 << 20, now) == "ignored"
    bad_version = good.replace(b"\xa1v\x01", b"\xa1v\x07")
    assert classify("heald/v1/s1/n1/risk", bad_version, 1 << 20, now) == "version"


def test_subscriptions_share_only_unretained_kinds() -> None:
    assert subscriptions("") == [
        f"heald/v1/+/+/{k}"
        for k in ("birth", "status", "metrics", "risk", "event", "action", "cmd_ack", "cost")
    ]
    shared = subscriptions("g")
    assert "heald/v1/+/+/birth" in shared
    assert "heald/v1/+/+/status" in shared
    assert "$share/g/heald/v1/+/+/metrics" in shared
    assert "$share/g/heald/v1/+/+/cmd_ack" in shared
    assert "$share/g/heald/v1/+/+/cost" in shared
    assert [subscription_qos(t) for t in shared] == [1, 1, 0, 1, 1, 1, 1, 1]
