"""Demand forecasts against what came, per site and for the fleet (``GET /api/demand``).

The nodes' demand summaries ride on their cost summaries (:class:`agent.wire.DemandSummary` in
:class:`agent.wire.Cost`'s ``demand``), stored as JSON in the ``cost`` table: the actual and
predicted values of every period in ``demand`` (small, read for the whole window) and the forecasts
in ``demand_forecast`` (read for each node's latest summary only).
:meth:`DemandQueries.fleet` rolls them up by metric family (``net.rx_bytes_per_s[eth0]`` and
``[eth1]`` are ``net.rx_bytes_per_s``): a family measured in percent (``*_pct``) is averaged over a
node's resources and over the nodes; any other (bytes per second) is summed. Per site and for the
fleet, per family:

* ``actual`` and ``predicted``: ``[bucket start, value]`` per ``bucket_s`` (each node's periods in
  the bucket averaged first): what came, and what the forecast sent with the period before said;
* ``mae`` and ``error_pct``: the mean absolute error of ``predicted`` over the buckets that have both,
  and the same as a share of the actual (sum |a - p| / sum |a|);
* ``forecast``: the nodes' latest forecasts, on one time axis (``t``: the start of each step),
  rolled up the same way over the steps every node's forecast covers; ``lo``/``hi`` roll up the
  nodes' intervals alike (summed intervals are wider than the sum's own: conservative).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from typing import Any, Final

from coordinator.store.database import Cursor, Database

#: (site, node, family, bucket) -> resource -> the values of the bucket's periods
Cells = dict[tuple[str, str, str, float], dict[str, list[float]]]

#: Summaries read for one roll-up at most.
MAX_ROWS: Final = 200_000
#: Forecast steps shown per family at most.
MAX_STEPS: Final = 2016


def family(resource: str) -> str:
    return resource.split("[", 1)[0]


def averaged(fam: str) -> bool:
    """Percentages are averaged over resources and nodes; rates and amounts are summed."""
    return fam.endswith("_pct")


def _agg(fam: str, values: list[float]) -> float:
    return sum(values) / len(values) if averaged(fam) else sum(values)


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _json(text: object) -> object:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _series(v: object) -> list[float] | None:
    if not isinstance(v, list):
        return None
    out = [_num(x) for x in v[:MAX_STEPS]]
    return None if any(x is None for x in out) else [x for x in out if x is not None]


class DemandQueries:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def fleet(self, *, hours: int = 48, bucket_s: int = 3600,
                    now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        since = now - hours * 3600.0

        def run(cur: Cursor) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            periods = [dict(r) for r in self.db.rows(
                cur, "SELECT c.node AS node, n.site AS site, c.end_ts AS end_ts, c.demand AS demand "
                "FROM cost c JOIN nodes n ON n.node = c.node WHERE c.end_ts >= ? AND c.demand <> '[]' "
                "ORDER BY c.end_ts LIMIT ?", (since, MAX_ROWS))]
            newest = [dict(r) for r in self.db.rows(
                cur, "SELECT c.node AS node, n.site AS site, c.end_ts AS end_ts, c.demand_forecast AS fc "
                "FROM cost c JOIN nodes n ON n.node = c.node JOIN (SELECT node, MAX(end_ts) AS e FROM cost "
                "WHERE end_ts >= ? AND demand_forecast <> '' GROUP BY node) l "
                "ON l.node = c.node AND l.e = c.end_ts WHERE c.demand_forecast <> '' LIMIT ?",
                (since, MAX_ROWS))]
            return periods, newest

        rows, newest = await self.db.read(run)
        actual: Cells = defaultdict(lambda: defaultdict(list))
        predicted: Cells = defaultdict(lambda: defaultdict(list))
        for r in rows:
            items = _json(r["demand"])
            if not isinstance(items, list):
                continue
            bucket = math.floor(float(r["end_ts"]) / bucket_s) * bucket_s
            site, node = str(r["site"]), str(r["node"])
            for it in items:
                if not (isinstance(it, list) and len(it) == 3 and isinstance(it[0], str)):
                    continue
                key = (site, node, family(it[0]), bucket)
                a, p = _num(it[1]), _num(it[2])
                if a is not None:
                    actual[key][it[0]].append(a)
                if p is not None:
                    predicted[key][it[0]].append(p)
        latest: dict[str, tuple[str, float, list[Any]]] = {}  # node -> site, end, forecasts
        for r in newest:
            items = _json(r["fc"])
            if isinstance(items, list):
                latest[str(r["node"])] = (str(r["site"]), float(r["end_ts"]), items)
        sites = sorted({s for s, *_ in actual} | {s for s, _, _ in latest.values()})
        nodes_of: dict[str, set[str]] = defaultdict(set)
        for s, n, _f, _b in actual:
            nodes_of[s].add(n)
        for n, (s, _e, _i) in latest.items():
            nodes_of[s].add(n)
        out_sites = [{"site": s, "nodes": len(nodes_of[s]), "resources": self._scope(
            {k: v for k, v in actual.items() if k[0] == s}, {k: v for k, v in predicted.items() if k[0] == s},
            {n: v for n, v in latest.items() if v[0] == s})} for s in sites]
        return {
            "now": now, "hours": hours, "bucket_s": bucket_s,
            "fleet": {"nodes": len(set().union(*nodes_of.values())) if nodes_of else 0,
                      "resources": self._scope(actual, predicted, latest)},
            "sites": out_sites,
        }

    @staticmethod
    def _rollup(values: Cells) -> dict[str, dict[float, float]]:
        """family -> bucket -> value: per node the resources' period means rolled up, then the nodes."""
        per: dict[tuple[str, float], list[float]] = defaultdict(list)
        for (_s, _n, fam, bucket), by_res in values.items():
            node_val = _agg(fam, [sum(v) / len(v) for v in by_res.values() if v])
            per[(fam, bucket)].append(node_val)
        out: dict[str, dict[float, float]] = defaultdict(dict)
        for (fam, bucket), vals in per.items():
            out[fam][bucket] = _agg(fam, vals)
        return out

    def _scope(self, actual: Cells, predicted: Cells,
               latest: dict[str, tuple[str, float, list[Any]]]) -> list[dict[str, Any]]:
        act, pred = self._rollup(actual), self._rollup(predicted)
        fc = _forecasts(latest)
        out = []
        for fam in sorted(set(act) | set(pred) | set(fc)):
            a, p = act.get(fam, {}), pred.get(fam, {})
            both = [b for b in a if b in p]
            err = sum(abs(a[b] - p[b]) for b in both)
            base = sum(abs(a[b]) for b in both)
            out.append({
                "resource": fam, "agg": "mean" if averaged(fam) else "sum",
                "actual": [[b, round(v, 6)] for b, v in sorted(a.items())],
                "predicted": [[b, round(v, 6)] for b, v in sorted(p.items())],
                "mae": round(err / len(both), 6) if both else None,
                "error_pct": round(100.0 * err / base, 3) if both and base > 0 else None,
                "forecast": fc.get(fam),
            })
        return out


def _forecasts(latest: dict[str, tuple[str, float, list[Any]]]) -> dict[str, dict[str, Any]]:
    """The nodes' latest forecasts per family on one time axis (the most common step per family)."""
    # family -> step -> t -> node -> [(point, lo, hi) per resource]
    cells: dict[str, dict[float, dict[float, dict[str, list[tuple[float, float, float]]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for node, (_site, end, items) in latest.items():
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("resource"), str):
                continue
            step = _num(it.get("step_s"))
            point, lo, hi = _series(it.get("point")), _series(it.get("lo")), _series(it.get("hi"))
            if not step or step <= 0 or not point or lo is None or hi is None:
                continue
            first = (math.floor(end / step) + 1) * step
            for i, (pv, lv, hv) in enumerate(zip(point, lo, hi, strict=False)):
                cells[family(it["resource"])][step][first + i * step][node].append((pv, lv, hv))
    out: dict[str, dict[str, Any]] = {}
    for fam, by_step in cells.items():
        step, times = max(by_step.items(), key=lambda kv: (len(kv[1]), -kv[0]))
        everyone = {n for by_node in times.values() for n in by_node}
        # the steps every node's forecast covers (a sum over some of the nodes would dip)
        ts = [t for t in sorted(times) if len(times[t]) == len(everyone)] or sorted(times)
        ts = ts[:MAX_STEPS]
        rolled: list[tuple[float, float, float]] = []
        for t in ts:
            nodes = times[t].values()
            per_node = [tuple(_agg(fam, [v[j] for v in vals]) for j in range(3)) for vals in nodes]
            rolled.append(tuple(_agg(fam, [pn[j] for pn in per_node]) for j in range(3)))  # type: ignore[arg-type]
        out[fam] = {"step_s": step, "t": ts, "point": [round(v[0], 6) for v in rolled],
                    "lo": [round(v[1], 6) for v in rolled], "hi": [round(v[2], 6) for v in rolled],
                    "nodes": len({n for t in ts for n in times[t]})}
    return out
