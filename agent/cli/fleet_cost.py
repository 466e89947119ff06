"""``heald fleet cost``: what the fleet's resources idled (the coordinator's ``/api/cost``);
``heald fleet demand``: forecast against actual per site and for the fleet (``/api/demand``).

    heald fleet cost [--days N] [--top N] [--json]
    heald fleet demand [--hours N] [--bucket S] [--json]

Today, the last 7 days, the 7 days before and the trend; the top wasters of the week; the fleet
per day. Amounts are resource-hours (idle core-hours, idle GPU-hours, GPU memory held by idle GPUs
and unused memory in GiB-hours, kWh) and money at the nodes' ``[cost]`` prices. ``--json`` prints
the API's JSON as it is: the cost page shows the same numbers.

``demand``: per scope (the fleet, then each site) and resource family, the last bucket's actual and
predicted demand, the error of the predictions over the window, and the peak of the latest forecast
and how far ahead it is. ``--json`` prints ``/api/demand``'s JSON, which the demand page shows.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Protocol

from agent.cli.base import out, table
from agent.errors import InputError, Problem

COLUMNS = (("idle_core_h", "idle core-h"), ("idle_gpu_h", "idle GPU-h"),
           ("gpu_mem_idle_gib_h", "idle GPU GiB-h"), ("mem_stranded_gib_h", "unused mem GiB-h"),
           ("energy_kwh", "kWh"), ("money", "money"))


class _Client(Protocol):
    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any: ...


def add(sub: Any) -> argparse.ArgumentParser:
    what = "what the fleet's resources idled: per day, this week, top wasters, trend"
    p: argparse.ArgumentParser = sub.add_parser("cost", help=what, description=what)
    p.add_argument("--days", type=int, default=14, help="days of the per-day table (1..366, default 14)")
    p.add_argument("--top", type=int, default=10, help="top wasters shown (0..1000, default 10)")
    return p


def add_demand(sub: Any) -> argparse.ArgumentParser:
    what = "demand forecasts against what came, per site and for the fleet"
    p: argparse.ArgumentParser = sub.add_parser("demand", help=what, description=what)
    p.add_argument("--hours", type=int, default=48, help="hours of history (1..1440, default 48)")
    p.add_argument("--bucket", type=int, default=3600, help="seconds per bucket (1..86400, default 3600)")
    return p


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def handle_demand(client: _Client, args: argparse.Namespace, *, as_json: bool) -> int:
    if not 1 <= args.hours <= 1440 or not 1 <= args.bucket <= 86400:
        raise InputError([Problem(file="fleet", key="--hours",
                                  message="--hours must be 1..1440 and --bucket 1..86400")])
    data = client.request("GET", f"/api/demand?hours={args.hours}&bucket_s={args.bucket}")
    if as_json:
        out(json.dumps(data, indent=2))
        return 0
    now = float(data.get("now", time.time()))
    rows = []
    for name, scope in (("fleet", data["fleet"]), *((f"site {s['site']}", s) for s in data["sites"])):
        for r in scope["resources"]:
            fc = r.get("forecast")
            peak = "-"
            if fc and fc["point"]:
                i = max(range(len(fc["point"])), key=fc["point"].__getitem__)
                peak = f"{fc['point'][i]:.6g} in {max(0.0, fc['t'][i] - now) / 60:.0f} min"
            last_a = r["actual"][-1][1] if r["actual"] else None
            last_p = r["predicted"][-1][1] if r["predicted"] else None
            err = "-" if r.get("error_pct") is None else f"{r['error_pct']:.1f}%"
            rows.append([name, str(scope["nodes"]), r["resource"], r["agg"], _num(last_a), _num(last_p), err,
                         peak])
    out(f"fleet demand (last {data.get('hours')} h, {data.get('bucket_s')} s buckets)")
    heads = ["scope", "nodes", "resource", "roll-up", "actual", "predicted", "error", "forecast peak"]
    out(table(heads, rows, rule=True) if rows else "  no demand summaries yet")
    return 0


def _amounts(row: dict[str, Any]) -> list[str]:
    return [f"{float(row.get(k, 0.0)):.{4 if k == 'money' else 6}f}" for k, _ in COLUMNS]


def _trend(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.0f}%"


def handle(client: _Client, args: argparse.Namespace, *, as_json: bool) -> int:
    if not 1 <= args.days <= 366 or not 0 <= args.top <= 1000:
        raise InputError([Problem(file="fleet", key="--days",
                                  message="--days must be 1..366 and --top 0..1000")])
    data = client.request("GET", f"/api/cost?days={args.days}&top={args.top}")
    if as_json:
        out(json.dumps(data, indent=2))
        return 0
    heads = [h for _, h in COLUMNS]
    currency = data.get("currency") or "no prices set"
    out(f"fleet cost ({data.get('nodes', 0)} node(s) this week; money: {currency})")
    rows = [[name, *_amounts(data[key])] for name, key in
            (("today", "today"), ("last 7 days", "week"), ("7 days before", "previous_week"))]
    rows.append(["trend", *[_trend(data["trend"].get(k)) for k, _ in COLUMNS]])
    out(table(["period", *heads], rows, rule=True))
    out()
    out("top wasters (last 7 days)")
    out(table(["node", "class", *heads], [[n["node"], n["node_class"], *_amounts(n)] for n in data["top"]],
              rule=True) if data["top"] else "  none")
    out()
    out(table(["day", *heads], [[time.strftime("%Y-%m-%d", time.gmtime(d["day"])), *_amounts(d)]
                                for d in data["days"]], rule=True))
    return 0
