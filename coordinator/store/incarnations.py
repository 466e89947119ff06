"""Node incarnations: a node's seqs, as the store keys them, across reinstalls; seq jumps held back.

An agent's ``seq`` is strictly increasing only within one state directory: after a reinstall or
a lost ``/var/lib/heald`` it starts again near 0, and ``(node, seq)`` would call its new reports
duplicates of old ones (the node froze, shown offline with its old risk). So every report carries
its sender's incarnation (``inc``, new with every new state directory; ``""`` for agents that
predate it), and the store keys it ``(node, base + seq)`` with a ``base`` of its own for each
incarnation of a node: ``k * 2**48`` for the node's k-th incarnation (the legacy one, and a
node's first, has 0, so stores written before incarnations keep their keys). Duplicates are still
one row; two incarnations sending at once (a reinstalled node and a forger, say) never share a
key. The node's current state follows the incarnation that reported last (:func:`switch`).

A seq far ahead of its incarnation's last (more than :data:`SEQ_JUMP_MAX`), or a new incarnation
of a node that has one already starting far from 0, is not trusted: one forged report with a
huge seq would otherwise make every later real one look old, hiding real alerts. It is
quarantined (left out, counted on the node and in the ingest's rejects); only if reports keep
coming beyond the jump for :data:`JUMP_CONFIRM_S` is it believed. What the broker's per-node ACL
and client-id binding stop (docs/mqtt-tls-acl.md), this only limits: a sender that may publish as
a node can always send that node's reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from coordinator.model import BatchResult, Incoming, StoreRejected
from coordinator.store.database import Cursor, Database, DbRow

#: The key space of one incarnation: seqs at or above it are quarantined (an agent numbers a
#: report a second for 8.9 million years before it gets there).
SEQ_SPAN: Final = 2**48
#: How far a report's seq may run ahead of the last one of its incarnation. An agent skips at
#: most a reserved block (1000) per restart and numbers every report it spools, shed or not.
SEQ_JUMP_MAX: Final = 1_000_000
#: How long reports must keep coming beyond a jump before it is believed.
JUMP_CONFIRM_S: Final = 600.0

_COLUMNS: Final = ("node", "inc", "base", "last_seq", "first_seen", "jump_seq", "jump_since")


class Incarnations:
    """Assigns stored seqs for one batch, inside its transaction, with the nodes' rows locked."""

    def __init__(self, db: Database, cur: Cursor) -> None:
        self.db = db
        self.cur = cur

    def _load(self, names: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(row["node"], row["inc"]): row
                for row in self.db.rows_in(self.cur, "SELECT * FROM incarnations", "node", names)}

    def assign(self, items: Sequence[Incoming], nodes: dict[str, DbRow],
               result: BatchResult) -> list[Incoming]:
        """The batch's reports with their stored seqs; quarantined ones go to ``result.rejected``."""
        rows = self._load(sorted({i.message.node for i in items}))
        bases: dict[str, int] = {}  # node -> the highest base of its incarnations
        for (name, _), r in rows.items():
            bases[name] = max(bases.get(name, -SEQ_SPAN), int(r["base"]))
        versioned = {name for name, inc in rows if inc != ""}  # nodes with a non-legacy incarnation
        created: list[tuple[str, str]] = []
        changed: set[tuple[str, str]] = set()
        kept: list[Incoming] = []
        for item in items:
            m = item.message
            key = (m.node, m.inc)
            if m.seq >= SEQ_SPAN:
                _quarantine(nodes[m.node], item, result, f"seq {m.seq} is out of range")
                continue
            row = rows.get(key)
            if row is None:
                base = bases[m.node] = bases.get(m.node, -SEQ_SPAN) + SEQ_SPAN
                row = rows[key] = {"node": m.node, "inc": m.inc, "base": base, "last_seq": -1,
                                   "first_seen": item.received_at, "jump_seq": -1, "jump_since": 0.0}
                created.append(key)
                if m.node in versioned and m.seq > SEQ_JUMP_MAX:
                    row.update(jump_seq=m.seq, jump_since=item.received_at)  # a new one starts near 0
                if m.inc != "":
                    versioned.add(m.node)
            last = int(row["last_seq"])
            if (last >= 0 and m.seq > last + SEQ_JUMP_MAX) or (last < 0 and row["jump_since"]):
                if not row["jump_since"]:
                    row.update(jump_seq=m.seq, jump_since=item.received_at)
                changed.add(key)
                if item.received_at - float(row["jump_since"]) < JUMP_CONFIRM_S:
                    _quarantine(nodes[m.node], item, result,
                                f"seq {m.seq} of incarnation {m.inc!r} jumps ahead of {last}")
                    continue
                row.update(jump_seq=-1, jump_since=0.0)  # reports kept coming: the jump was real
            row["last_seq"] = max(last, m.seq)
            changed.add(key)
            base = int(row["base"])
            kept.append(item if base == 0 else Incoming(  # a node's first incarnation keeps its seqs
                message=msgspec.structs.replace(m, seq=base + m.seq), kind=item.kind,
                received_at=item.received_at))
        if created:
            self.db.execute_many(
                self.cur,
                "INSERT INTO incarnations (node, inc, base, last_seq, first_seen, jump_seq, jump_since) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [[rows[k][c] for c in _COLUMNS] for k in created],
            )
        update = sorted(changed.difference(created))  # (a list: quadratic when a fleet joins at once)
        if update:
            self.db.update_rows(
                self.cur, "incarnations", ("node", "inc"), ("last_seq", "jump_seq", "jump_since"),
                [(rows[k]["last_seq"], rows[k]["jump_seq"], rows[k]["jump_since"], *k) for k in update],
            )
        return kept


def _quarantine(node: DbRow, item: Incoming, result: BatchResult, why: str) -> None:
    node["quarantined"] = int(node["quarantined"]) + 1
    m = item.message
    result.rejected.append(StoreRejected(node=m.node, kind=item.kind, seq=m.seq, error=why,
                                         reason="seq_jump"))


def switch(node: DbRow, inc: str) -> None:
    """The node's reports now come from incarnation ``inc``: its state follows them from here.

    The per-kind "newest applied" marks (presence by bdseq, risk and action by seq, the sample
    seq of the metric-gap count) belonged to the other incarnation, whose numbers mean nothing
    to this one (a reinstalled agent starts bdseq at 1 again): they start over.
    """
    node.update(inc=inc, bdseq=-1, status_bdseq=-1, status_off=0, status_seq=-1, risk_seq=-1, action_seq=-1,
                last_sample_seq=-1)


#: A sample seq this far below the last one is a restart of the numbering (a power loss took the
#: agent's last counter writes), not a late sample: the count starts over from it.
_RESTART: Final = 100_000


def count_gaps(node: DbRow, samples: Sequence[Any]) -> None:
    """Add the samples a metrics batch shows to be missing (sample seqs skipped) to the node's
    ``metric_gaps``. Sample seqs go on across agent restarts (per incarnation), so a sample the
    agent took and the store never got is a gap, whatever lost it: a kill -9 before its batch
    was spooled, a QoS 0 batch lost with a broker, a spool's shed."""
    last = int(node["last_sample_seq"])
    gaps = 0
    for sample in samples:
        seq = int(sample.seq)
        if last >= 0 and seq > last + 1:
            gaps += seq - last - 1
        if seq > last or seq < last - _RESTART:
            last = seq
    node["last_sample_seq"] = last
    node["metric_gaps"] = int(node["metric_gaps"]) + gaps
