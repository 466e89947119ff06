"""What the notifier's look at the store costs, on a fleet-sized SQLite store.

    python3 bench/notify_scan.py [--nodes 10000] [--offline 500] [--rounds 50]

Fills a fresh store with ``--nodes`` nodes (birth + online status each), ``--offline`` of them
gone offline (their will) and one escalation each, then times :meth:`Outbox.scan`: the first
look (everything queued), a steady look with nothing new (what runs every ``poll_interval_s``),
and a look right after every node reported again (each ``nodes`` row updated), and a quiet look
(nothing changed within the look-back window: the common case). Prints a table
with the date and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.wire import kind_of
from coordinator.config import BudgetSection, NotifyRoute, NotifySection, StoreSection
from coordinator.model import Incoming
from coordinator.notify.outbox import SCAN_OVERLAP_S, Outbox
from coordinator.store import open_store
from devtools.fleet_sim import SimNode


def inc(message: object) -> Incoming:
    return Incoming(message=message, kind=kind_of(message), received_at=time.time())  # type: ignore[arg-type]


async def timed(fn: object) -> float:
    started = time.perf_counter()
    await fn  # type: ignore[misc]
    return (time.perf_counter() - started) * 1000


async def main(nodes: int, offline: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await open_store(f"sqlite:///{tmp}/c.db", StoreSection(), BudgetSection(), replica="b")
        fleet = [SimNode(f"n{i:05d}") for i in range(nodes)]
        wills = [n.status("offline", "connection lost") for n in fleet[:offline]]
        for i in range(0, nodes, 2000):
            await store.apply([inc(m) for n in fleet[i:i + 2000] for m in (n.birth(), n.status())])
        gone = []
        for n, w in zip(fleet[:offline], wills, strict=True):
            escalated = n.event("playbook.escalated", {"playbook": "pb", "run_id": "r1"}, "gave up")
            gone += [inc(msgspec.structs.replace(w, bdseq=n.bdseq)), inc(escalated)]
        await store.apply(gone)
        outbox = Outbox(store.db, NotifySection(routes=[NotifyRoute(name="hook", url="http://127.0.0.1:9/")]))
        first = await timed(outbox.scan())
        steady = [await timed(outbox.scan()) for _ in range(rounds)]
        await asyncio.sleep(SCAN_OVERLAP_S + 1)  # past the look-back window
        await outbox.scan()
        quiet = [await timed(outbox.scan()) for _ in range(rounds)]
        for i in range(0, nodes, 2000):
            await store.apply([inc(n.status()) for n in fleet[i:i + 2000]])
        after = await timed(outbox.scan())
        queued = sum((await outbox.counts()).values())
        await store.close()
    print(f"# notify scan, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"# {nodes} nodes, {offline} offline with an escalation each; {queued} outbox rows")
    print("| look | ms |")
    print("|---|---|")
    print(f"| first (queues everything) | {first:.1f} |")
    print(f"| steady, nothing new (median of {rounds}) | {statistics.median(steady):.2f} |")
    print(f"| steady, max | {max(steady):.2f} |")
    quiet_ms = statistics.median(quiet)
    print(f"| quiet: nothing changed for {SCAN_OVERLAP_S:.0f} s (median of {rounds}) | {quiet_ms:.2f} |")
    print(f"| after every node reported again | {after:.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--offline", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="200 nodes, 20 offline, 3 rounds")
    a = ap.parse_args()
    if a.smoke:
        a.nodes, a.offline, a.rounds = 200, 20, 3
    asyncio.run(main(a.nodes, a.offline, a.rounds))
