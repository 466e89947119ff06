"""Cost summaries: the ``cost`` history table (one row per node summary) and the fleet roll-ups.

The row also keeps the summary's demand part (``demand``, JSON), which :mod:`coordinator.store.demand`
rolls up.

Each node sends what its resources idled over a period (:class:`agent.wire.Cost`); the store keeps
the rows (keyed ``(node, seq)`` like every report) and :meth:`CostQueries.fleet` sums them per day,
per node and per week: the fleet's waste, the top wasters and the trend of the last days.
"""

from __future__ import annotations

import math
import time
from typing import Any, Final

from agent.wire import Cost
from coordinator.store.database import Cursor, Database
from coordinator.store.rows import dumps

#: The resource-hour columns of the table, in the order of :class:`agent.wire.Cost`.
AMOUNTS: Final = ("money", "seconds", "core_h", "idle_core_h", "cores_under_line_h", "gpu_h", "idle_gpu_h",
                  "gpu_mem_idle_gib_h", "mem_stranded_gib_h", "energy_kwh")

_COLUMNS: Final = ", ".join(AMOUNTS)
_MARKS: Final = ", ".join("?" * (7 + len(AMOUNTS)))
_MARKS_DEMAND: Final = _MARKS + ", ?, ?"
INSERT: Final = (
    "INSERT INTO cost (node, seq, ts, start_ts, end_ts, node_class, currency, " + _COLUMNS  # noqa: S608 - constants
    + ", demand, demand_forecast) VALUES (" + _MARKS_DEMAND + ") ON CONFLICT DO NOTHING RETURNING seq"
)

DDL: Final = f"""
CREATE TABLE IF NOT EXISTS cost (
  node TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
  start_ts DOUBLE PRECISION NOT NULL, end_ts DOUBLE PRECISION NOT NULL,
  node_class TEXT NOT NULL, currency TEXT NOT NULL,
  {', '.join(f'{a} DOUBLE PRECISION NOT NULL' for a in AMOUNTS)},
  demand TEXT NOT NULL DEFAULT '[]', demand_forecast TEXT NOT NULL DEFAULT '', PRIMARY KEY (node, seq)
);
CREATE INDEX IF NOT EXISTS cost_end ON cost (end_ts)
"""

DAY: Final = 86400.0
#: Rows read for one roll-up at most (a 1000-node fleet's two weeks of hourly summaries is 336k).
MAX_ROWS: Final = 500_000


#: Schema 3 -> 4: the demand summaries that ride on a cost summary (coordinator/store/demand.py):
#: ``demand``, ``[[resource, actual, predicted], ...]`` (JSON, small: read for every period), and
#: ``demand_forecast``, the forecasts (JSON, ``""`` when none: read for each node's latest only).
MIGRATE_TO_4: Final = ("ALTER TABLE cost ADD COLUMN demand TEXT NOT NULL DEFAULT '[]'",
                       "ALTER TABLE cost ADD COLUMN demand_forecast TEXT NOT NULL DEFAULT ''")


def history_row(m: Cost) -> tuple[Any, ...]:
    forecasts = [{"resource": d.resource, "step_s": d.step_s, "point": d.point, "lo": d.lo, "hi": d.hi}
                 for d in m.demand if d.point]
    values = [[d.resource, d.actual, d.predicted] for d in m.demand]
    return (m.node, m.seq, m.ts, m.start, m.end, m.node_class, m.currency, *(getattr(m, a) for a in AMOUNTS),
            dumps(values), dumps(forecasts) if forecasts else "")


def _zero() -> dict[str, float]:
    return dict.fromkeys(AMOUNTS, 0.0)


def _add(into: dict[str, float], row: dict[str, Any]) -> None:
    for a in AMOUNTS:
        into[a] += float(row[a])


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in d.items()}


class CostQueries:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def fleet(self, *, days: int = 14, top: int = 10, now: float | None = None) -> dict[str, Any]:
        """Fleet waste per day (the last ``days``), today, this week (7 days), top wasters of the
        week by money then idle core+GPU hours, and the trend (this week against the one before)."""
        now = time.time() if now is None else now
        days = max(1, min(days, 366))
        today = math.floor(now / DAY) * DAY
        since = today - (max(days, 14) - 1) * DAY

        def run(cur: Cursor) -> list[dict[str, Any]]:
            return [dict(r) for r in self.db.rows(
                cur, f"SELECT node, node_class, currency, end_ts, {', '.join(AMOUNTS)} FROM cost "  # noqa: S608
                "WHERE end_ts >= ? ORDER BY end_ts LIMIT ?", (since, MAX_ROWS))]

        rows = await self.db.read(run)
        per_day: dict[float, dict[str, float]] = {}
        week, prev_week, day = _zero(), _zero(), _zero()
        nodes: dict[str, dict[str, Any]] = {}
        currencies: set[str] = set()
        for r in rows:
            d = math.floor(float(r["end_ts"]) / DAY) * DAY
            if d >= today - (days - 1) * DAY:
                _add(per_day.setdefault(d, _zero()), r)
            if r["currency"]:
                currencies.add(str(r["currency"]))
            if d == today:
                _add(day, r)
            if d > today - 7 * DAY:
                _add(week, r)
                n = nodes.setdefault(r["node"], {"node": r["node"], "node_class": r["node_class"]} | _zero())
                _add(n, r)
                n["node_class"] = r["node_class"]
            elif d > today - 14 * DAY:
                _add(prev_week, r)
        wasters = sorted(nodes.values(), key=lambda n: (-n["money"], -(n["idle_core_h"] + n["idle_gpu_h"]),
                                                       n["node"]))[:max(0, top)]
        trend = {a: (None if prev_week[a] == 0 else round((week[a] - prev_week[a]) / prev_week[a], 4))
                 for a in ("money", "idle_core_h", "idle_gpu_h", "mem_stranded_gib_h", "energy_kwh")}
        return {
            "now": now,
            "currency": ",".join(sorted(currencies)),
            "today": _rounded(day),
            "week": _rounded(week),
            "previous_week": _rounded(prev_week),
            "trend": trend,
            "days": [{"day": d} | _rounded(v) for d, v in sorted(per_day.items())],
            "top": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in n.items()} for n in wasters],
            "nodes": len(nodes),
        }
