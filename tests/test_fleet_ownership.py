"""Fleet data integrity at the store (issue 18, items 2 and 5), on SQLite and PostgreSQL.

Item 2: counters that go backwards froze a node (a reinstalled agent's reports, whose seqs start
again, were taken for duplicates; it showed offline with its risk frozen), and one report with a
huge seq hid every later real alert. Item 5: any node could set the status of any command, claim
another node's approval first, and move itself to another site (and budget group).

Each test sends what an attacker or a reinstalled agent sends, through the store's real apply.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import test_coordinator_store as kit

from agent.wire.messages import CommandAck
from agent.wire.signing import CommandSigner
from coordinator.config import StoreSection
from coordinator.store import Store, open_store
from coordinator.store.schema import SCHEMA, SCHEMA_VERSION
from devtools.fleet_sim import SimNode

# the store fixtures (SQLite, and PostgreSQL when it answers) of the store's own tests
pg_admin, pg_url, store_url, store = kit.pg_admin, kit.pg_url, kit.store_url, kit.store
inc, BUDGET = kit.inc, kit.BUDGET

# ---------------------------------------------------------------------------- item 2: incarnations


@pytest.mark.asyncio
async def test_a_reinstalled_node_is_not_taken_for_duplicates(store: Store) -> None:
    old = SimNode("n1", site="lab")
    await store.apply([inc(old.birth()), inc(old.status()), inc(old.risk(0.2)), inc(old.metrics(2))])
    await store.apply([inc(old.status("offline", "connection lost"))])
    assert (await store.get_node("n1"))["online"] is False
    # the node is reinstalled: a new state directory, a new incarnation, seqs from 1 again
    new = SimNode("n1", site="lab")
    assert new.inc != old.inc
    result = await store.apply([inc(new.birth()), inc(new.status()), inc(new.risk(1.7))])
    assert (result.new, result.duplicates) == (3, 0)
    node = await store.get_node("n1")
    assert node["online"] is True, "bdseq 1 again: the new incarnation's birth counts"
    assert (node["anomaly"], node["alert"]) == (1.7, True)
    assert node["inc"] == new.inc
    # and the old incarnation's reports are still there, under their own keys
    assert len(await store.node_risk("n1", since=0)) == 2


@pytest.mark.asyncio
async def test_a_forged_huge_seq_is_quarantined_and_later_real_alerts_show(store: Store) -> None:
    real = SimNode("n1", site="lab")
    await store.apply([inc(real.birth()), inc(real.status()), inc(real.risk(0.1))])
    forged = msgspec.structs.replace(real.risk(0.1), seq=2**62)  # one report, a seq far ahead
    result = await store.apply([inc(forged)])
    assert result.new == 0
    assert [(r.reason, r.seq) for r in result.rejected] == [("seq_jump", 2**62)]
    result = await store.apply([inc(real.risk(2.5))])  # the real node's next report: an alert
    assert result.new == 1
    node = await store.get_node("n1")
    assert (node["anomaly"], node["alert"]) == (2.5, True), "the real alert is not hidden"
    assert node["quarantined"] == 1


@pytest.mark.asyncio
async def test_a_jump_that_keeps_coming_is_believed_after_ten_minutes(store: Store) -> None:
    n = SimNode("n1", site="lab")
    await store.apply([inc(n.birth())])
    n.seq += 2_000_000  # a real jump (say, a huge spool shed): the node goes on from there
    t0 = time.time()
    first = await store.apply([inc(n.risk(0.1), received_at=t0)])
    assert first.rejected
    later = await store.apply([inc(n.risk(0.2), received_at=t0 + 601)])
    assert later.new == 1
    assert (await store.get_node("n1"))["anomaly"] == 0.2


@pytest.mark.asyncio
async def test_incarnations_new_in_one_batch_get_their_own_bases_and_the_jump_rule(store: Store) -> None:
    """A fleet joining at once: several incarnations of a node first seen in the same batch get a
    base each, in the order they come, and a second incarnation that starts far from 0 is
    quarantined unless the node's only other incarnation is the legacy one (agents before
    incarnations numbered on from their old seq)."""
    legacy = SimNode("a", site="lab", inc="")
    after_legacy = SimNode("a", site="lab")
    after_legacy.seq = 2_000_000
    first, second = SimNode("b", site="lab"), SimNode("b", site="lab")
    second.seq = 2_000_000
    quiet = [SimNode(f"q{i:03d}", site="lab") for i in range(300)]
    batch = [inc(legacy.birth()), inc(after_legacy.risk(0.1)), inc(first.birth()), inc(second.risk(0.1))]
    result = await store.apply(batch + [inc(q.birth()) for q in quiet])
    assert [(r.node, r.reason) for r in result.rejected] == [("b", "seq_jump")]
    assert result.new == 3 + len(quiet)

    def bases(cur: Any) -> list[tuple[str, str, int]]:
        return [(r["node"], r["inc"], int(r["base"])) for r in store.db.rows(
            cur, "SELECT node, inc, base FROM incarnations WHERE node IN ('a', 'b') ORDER BY node, base")]

    assert await store.db.read(bases) == [
        ("a", "", 0), ("a", after_legacy.inc, 2**48), ("b", first.inc, 0), ("b", second.inc, 2**48)]


@pytest.mark.asyncio
async def test_metric_gaps_are_counted_per_node(store: Store) -> None:
    n = SimNode("n1", site="lab")
    await store.apply([inc(n.birth()), inc(n.metrics(3))])
    m = n.metrics(3)
    lost = msgspec.structs.replace(m, samples=[msgspec.structs.replace(s, seq=s.seq + 5) for s in m.samples])
    await store.apply([inc(lost)])
    node = await store.get_node("n1")
    # SimNode numbers a batch's samples seq*10+i: the gap is the samples in between, plus 5
    assert node["metric_gaps"] > 0
    before = node["metric_gaps"]
    await store.apply([inc(msgspec.structs.replace(lost, seq=lost.seq))])  # the same batch again
    assert (await store.get_node("n1"))["metric_gaps"] == before, "a duplicate adds no gap"


# ---------------------------------------------------------------------------- item 5: ownership


@pytest.mark.asyncio
async def test_only_the_commands_node_sets_its_status(store: Store) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    a, b = SimNode("node-a", site="lab"), SimNode("node-b", site="lab")
    await store.apply([inc(a.birth()), inc(b.birth())])
    cmd = CommandSigner(Ed25519PrivateKey.generate()).make(node="node-b", site="lab", name="status")
    await store.issue_command(cmd, "ops", "status")

    def ack(sender: SimNode, status: str) -> CommandAck:
        env = sender._env()
        return CommandAck(**env, command_id=cmd.id, status=status, message="")  # type: ignore[arg-type]

    await store.apply([inc(ack(a, "done"))])  # node-a acks node-b's command
    commands = (await store.get_node("node-b"))["commands"]
    assert [c["status"] for c in commands] == ["sent"], "another node's ack is ignored"
    await store.apply([inc(ack(b, "done"))])
    assert [c["status"] for c in (await store.get_node("node-b"))["commands"]] == ["done"]


@pytest.mark.asyncio
async def test_a_node_cannot_claim_another_nodes_approval(store: Store) -> None:
    a, b = SimNode("node-a", site="lab"), SimNode("node-b", site="lab")
    await store.apply([inc(a.birth()), inc(b.birth())])
    request = {"request_id": "node-b-pb-1a2b3c4d", "run_id": "r1", "playbook": "pb"}
    await store.apply([inc(a.event("approval_request", request))])  # node-a first, with node-b's id
    await store.apply([inc(b.event("approval_request", request))])  # the real request
    b_approvals = (await store.get_node("node-b"))["approvals"]
    assert [(x["id"], x["node"], x["state"]) for x in b_approvals] == [
        ("node-b-pb-1a2b3c4d", "node-b", "pending")]
    a_approvals = (await store.get_node("node-a"))["approvals"]
    assert [x["id"] for x in a_approvals] == ["node-a-node-b-pb-1a2b3c4d"], "stored in node-a's own space"
    assert (await store.get_approval("node-b-pb-1a2b3c4d"))["request_id"] == "node-b-pb-1a2b3c4d"


@pytest.mark.asyncio
async def test_a_node_does_not_move_itself_to_another_site(store: Store) -> None:
    n = SimNode("n1", site="lab")
    await store.apply([inc(n.birth()), inc(n.status())])
    n.site = "prod"  # the node claims another site (and so another blast-radius budget group)
    lease = n.event("lease_request", {"request_id": "n1-x", "playbook": "pb"}, value=30)
    result = await store.apply([inc(n.risk(0.3)), inc(lease)])
    node = await store.get_node("n1")
    assert (node["site"], node["pending_site"]) == ("lab", "prod")
    assert [r.site for r in result.lease_requests] == ["lab"], "its lease counts in its own site's group"
    was = await store.set_site("n1", "prod", "ops")  # the operator's move
    assert was == "lab"
    node = await store.get_node("n1")
    assert (node["site"], node["pending_site"]) == ("prod", "")


# ---------------------------------------------------------------------------- the schema migration


@pytest.mark.asyncio
async def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    """A store written before incarnations: its reports keep their keys; an old agent (no inc)
    goes on where it was, and its duplicates are still duplicates."""
    v1 = SCHEMA
    for column in ("  inc TEXT NOT NULL DEFAULT '',\n", "  last_sample_seq BIGINT NOT NULL DEFAULT -1,\n",
                   "  metric_gaps BIGINT NOT NULL DEFAULT 0,\n", "  quarantined BIGINT NOT NULL DEFAULT 0,\n",
                   ",\n  request_id TEXT NOT NULL DEFAULT ''"):
        assert column in v1
        v1 = v1.replace(column, "")
    v1 = v1.replace("  updated_at DOUBLE PRECISION NOT NULL,\n  pending_site TEXT NOT NULL DEFAULT ''\n",
                    "  updated_at DOUBLE PRECISION NOT NULL\n")
    cut = v1.index("CREATE TABLE IF NOT EXISTS incarnations"), v1.index("CREATE TABLE IF NOT EXISTS sessions")
    v1 = v1[: cut[0]] + v1[cut[1]:]
    db = tmp_path / "c.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(v1.replace("{ID}", "INTEGER PRIMARY KEY AUTOINCREMENT"))
        conn.execute("INSERT INTO meta VALUES ('schema', '1')")
        conn.execute("INSERT INTO nodes (node, site, first_seen, last_seen, updated_at) "
                     "VALUES ('n1', 'lab', 1, 1, 1)")
        conn.execute("INSERT INTO risk VALUES ('n1', 41, 1, 0, 0.1, 0, 0, 'm', '[]', '{}', '[]')")
    s = await open_store(f"sqlite:///{db}", StoreSection(), BUDGET, replica="t")
    try:
        old = SimNode("n1", site="lab", inc="")  # an agent from before incarnations
        old.seq = 40
        dup = old.risk(0.1)  # seq 41: already stored
        new = old.risk(0.9)  # seq 42
        result = await s.apply([inc(dup), inc(new)])
        assert (result.new, result.duplicates) == (1, 1)
        assert (await s.get_node("n1"))["anomaly"] == 0.9
    finally:
        await s.close()
    with sqlite3.connect(db) as conn:
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        assert version == str(SCHEMA_VERSION)  # 1 -> 2 -> ... in place
        assert conn.execute("SELECT inc, base, last_seq FROM incarnations").fetchall() == [("", 0, 42)]
