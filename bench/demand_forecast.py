"""Demand forecasts (agent.score.demand) against a seasonal-naive baseline on real traces.

    python3 bench/demand_forecast.py [--data ../shared/data] [--out bench/results/demand_forecast.txt]

Series: every nab/ series (5-minute samples; train and test joined, the model fitted on the
first half, scored on the second half) and, from each smd/ machine (1-minute samples; fitted on
`train`, scored on `test`), the two metrics with the highest lag-one-day autocorrelation *in
train* (chosen without looking at test). Every series evaluated is in the table.

Per series and horizon (1 h and 2 h): MASE vs seasonal naive = MAE of heald's forecast divided
by the MAE of the seasonal-naive forecast (the value one day earlier) over the same forecast
points (below 1: better than the baseline); the coverage of the 80% interval (q10..q90 of the
fit data's own errors). Rows where the naive MAE is 0 are shown as n/a.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.score.demand import DAY_S, CompiledDemand, fit_demand  # noqa: E402

F64 = np.ndarray


def forecast_at(model: CompiledDemand, y: F64, wall: F64, h: int) -> tuple[F64, F64, F64]:
    """For every origin t: the forecast of y[t + h] (point, lo, hi), as the daemon's scorer computes it."""
    m = model.meta
    prof = model.arrays["profile"][0]
    bins = prof.shape[0]
    a, p = float(model.arrays["alpha"][0]), float(model.arrays["phi"][0])
    ph = (np.floor(wall / m.step_s).astype(np.int64) % bins).astype(np.intp)
    dev = y - prof[ph]
    lev = np.empty_like(dev)
    level = 0.0
    for i, d in enumerate(dev.tolist()):
        if not math.isnan(d):
            level += a * (d - level)
        lev[i] = level
    ph_h = (ph + h) % bins
    point = prof[ph_h] + lev * p**h
    return point, point + model.arrays["err_lo"][0, h - 1], point + model.arrays["err_hi"][0, h - 1]


def evaluate(name: str, y: F64, step_s: float, split: int, hours: tuple[float, ...]) -> list[list[str]]:
    wall = np.arange(len(y), dtype=np.float64) * step_s
    model = fit_demand(y[:split, None], wall[:split], ["x"], step_s=step_s, horizon_s=max(hours) * 3600)
    season = round(DAY_S / step_s)
    rows = []
    for hrs in hours:
        h = round(hrs * 3600 / step_s)
        point, lo, hi = forecast_at(model, y, wall, h)
        origins = np.arange(max(split, season - h), len(y) - h)
        actual = y[origins + h]
        naive = y[origins + h - season]
        mae = float(np.mean(np.abs(actual - point[origins])))
        mae_n = float(np.mean(np.abs(actual - naive)))
        cover = float(np.mean((actual >= lo[origins]) & (actual <= hi[origins])))
        mase = f"{mae / mae_n:.3f}" if mae_n > 0 else "n/a"
        rows.append([name, f"{hrs:g}h", mase, f"{cover:.2f}", f"{mae:.4g}", f"{mae_n:.4g}",
                     "week" if model.meta.weekly else "day", f"{model.arrays['alpha'][0]:g}",
                     f"{model.arrays['phi'][0]:g}", str(len(origins))])
    return rows


def day_autocorr(x: F64, lag: int) -> float:
    a, b = x[:-lag], x[lag:]
    if a.std() == 0 or b.std() == 0:
        return -1.0
    return float(np.corrcoef(a, b)[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "demand_forecast.txt"))
    ap.add_argument("--smoke", action="store_true", help="one file of each data set, no results file")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "nab").is_dir() and not (data / "smd").is_dir():
        raise SystemExit(f"no nab/ or smd/ data under {data}")
    take = 1 if args.smoke else None
    rows: list[list[str]] = []
    for path in sorted((data / "nab").glob("*.npz"))[:take]:
        with np.load(path) as z:
            y = np.concatenate([z["train"][:, 0], z["test"][:, 0]]).astype(np.float64)
        rows += evaluate(f"nab/{path.stem}", y, 300.0, len(y) // 2, (1.0, 2.0))
    for path in sorted((data / "smd").glob("*.npz"))[:take]:
        with np.load(path) as z:
            train, test = z["train"].astype(np.float64), z["test"].astype(np.float64)
        ac = [day_autocorr(train[:, j], 1440) for j in range(train.shape[1])]
        for j in sorted(np.argsort(ac)[::-1][:2].tolist()):
            y = np.concatenate([train[:, j], test[:, j]])
            rows += evaluate(f"smd/{path.stem}/m{j}", y, 60.0, len(train), (1.0, 2.0))
    head = ["series", "horizon", "MASE_vs_snaive", "cover80", "MAE", "MAE_snaive", "season",
            "alpha", "phi", "points"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        (f"# demand forecast vs seasonal naive, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
         f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
         f"python {platform.python_version()})"),
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for hz in ("1h", "2h"):
        vals = [float(r[2]) for r in rows if r[1] == hz and r[2] != "n/a"]
        cov = [float(r[3]) for r in rows if r[1] == hz]
        lines.append(f"# {hz}: {sum(v < 1 for v in vals)}/{len(vals)} series with MASE < 1; "
                     f"median MASE {np.median(vals):.3f}, mean {np.mean(vals):.3f}; "
                     f"median 80% coverage {np.median(cov):.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.smoke:
        print(f"smoke run: {args.out} left as it was")
        return 0
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
