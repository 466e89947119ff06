"""Demand forecasts (agent.score.demand) against a seasonal-naive baseline on real traces.

    python3 bench/demand_forecast.py [--data ../shared/data] [--out FILE] [--refit-daily] [--smoke]

Series: every nab/ series (5-minute samples; train and test joined, the model fitted on the
first half, scored on the second half) and, from each smd/ machine (1-minute samples; fitted on
`train`, scored on `test`), the two metrics with the highest lag-one-day autocorrelation *in
train* (chosen without looking at test). Every series evaluated is in the table.

Default (bench/results/demand_forecast.txt): one fit on the first part; every choice the fit makes
(smoothing, gamma, alpha, phi, the share of seasonal naive) uses the first part only. The scorer's
state (level, live profile, naive season) then runs through the scored part, as the daemon's does.
``--refit-daily`` (bench/results/demand_forecast_refit.txt): as the daemon runs it, a fit before
each scored day on the (at most) 14 days before that day; the day's forecasts come from it.

Per series and horizon (1 h and 2 h): MASE vs seasonal naive = MAE of heald's forecast divided
by the MAE of the seasonal-naive forecast (the value one day earlier) over the same forecast
points (below 1: better than the baseline); the coverage of the 80% interval (q10..q90 of the
fit data's own errors). Rows where the naive MAE is 0 are shown as n/a. Columns of the default
table: the fit's season, gamma, alpha, phi, choice (model, blend or naive), the model's share
w_model and the naive season; of the daily refits: how many fits and their choices.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.score.demand import DAY_S, backtest, fit_demand  # noqa: E402

F64 = np.ndarray


def evaluate(name: str, y: F64, step_s: float, split: int, hours: tuple[float, ...]) -> list[list[str]]:
    wall = np.arange(len(y), dtype=np.float64) * step_s
    model = fit_demand(y[:split, None], wall[:split], ["x"], step_s=step_s, horizon_s=max(hours) * 3600)
    season = round(DAY_S / step_s)
    rows = []
    w, lag, g = model.naive_weight(0)
    for hrs in hours:
        h = round(hrs * 3600 / step_s)
        point, lo, hi = (a[:, 0] for a in backtest(model, 0, y, wall, steps=[h], start=split))
        origins = np.arange(max(split, season - h), len(y) - h)
        actual = y[origins + h]
        naive = y[origins + h - season]
        mae = float(np.mean(np.abs(actual - point[origins])))
        mae_n = float(np.mean(np.abs(actual - naive)))
        cover = float(np.mean((actual >= lo[origins]) & (actual <= hi[origins])))
        mase = f"{mae / mae_n:.3f}" if mae_n > 0 else "n/a"
        rows.append([name, f"{hrs:g}h", mase, f"{cover:.2f}", f"{mae:.4g}", f"{mae_n:.4g}",
                     "week" if model.meta.weekly else "day", f"{g:g}", f"{model.arrays['alpha'][0]:g}",
                     f"{model.arrays['phi'][0]:g}", model.meta.choice[0], f"{w:g}",
                     "-" if w >= 1 else "day" if lag == season else "week", str(len(origins))])
    return rows


def evaluate_refit(name: str, y: F64, step_s: float, split: int, hours: tuple[float, ...], *,
                   history_days: float = 14.0) -> list[list[str]]:
    """As the daemon runs it ([demand] refit_interval_s = a day, history_days = 14): before each day
    of the scored part, a fit on the history up to that day (at most ``history_days``); the day's
    forecasts come from that fit, its scorer brought up to date on the window (live profile from
    the day's start). The grids and rules are the fixed split's; no fit sees its day."""
    wall = np.arange(len(y), dtype=np.float64) * step_s
    season = round(DAY_S / step_s)
    hmax = round(max(hours) * 3600 / step_s)
    pred = {hrs: np.full((len(y), 3), np.nan) for hrs in hours}
    choices: dict[str, int] = {}
    for d0 in range(split, len(y) - round(min(hours) * 3600 / step_s), season):
        lo_row = max(0, d0 - round(history_days * season))
        model = fit_demand(y[lo_row:d0, None], wall[lo_row:d0], ["x"], step_s=step_s,
                           horizon_s=max(hours) * 3600)
        choices[model.meta.choice[0]] = choices.get(model.meta.choice[0], 0) + 1
        end = min(len(y), d0 + season + hmax)
        for hrs in hours:
            h = round(hrs * 3600 / step_s)
            got = backtest(model, 0, y[lo_row:end], wall[lo_row:end], steps=[h], start=d0 - lo_row)
            day_rows = slice(d0, min(d0 + season, len(y)))
            for c, a in enumerate(got):
                pred[hrs][day_rows, c] = a[d0 - lo_row:d0 - lo_row + season, 0]
    rows = []
    for hrs in hours:
        h = round(hrs * 3600 / step_s)
        origins = np.arange(max(split, season - h), len(y) - h)
        point, lo, hi = pred[hrs][origins].T
        actual = y[origins + h]
        mae = float(np.mean(np.abs(actual - point)))
        mae_n = float(np.mean(np.abs(actual - y[origins + h - season])))
        cover = float(np.mean((actual >= lo) & (actual <= hi)))
        mase = f"{mae / mae_n:.3f}" if mae_n > 0 else "n/a"
        picked = " ".join(f"{k}:{v}" for k, v in sorted(choices.items()))
        rows.append([name, f"{hrs:g}h", mase, f"{cover:.2f}", f"{mae:.4g}", f"{mae_n:.4g}",
                     str(sum(choices.values())), picked, str(len(origins))])
    return rows


def day_autocorr(x: F64, lag: int) -> float:
    a, b = x[:-lag], x[lag:]
    if a.std() == 0 or b.std() == 0:
        return -1.0
    return float(np.corrcoef(a, b)[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=None, help="results file (default bench/results/demand_forecast.txt, "
                    "with --refit-daily demand_forecast_refit.txt)")
    ap.add_argument("--refit-daily", action="store_true",
                    help="refit before each scored day on the 14 days before it, as the daemon does")
    ap.add_argument("--smoke", action="store_true", help="one file of each data set, no results file")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "nab").is_dir() and not (data / "smd").is_dir():
        raise SystemExit(f"no nab/ or smd/ data under {data}")
    take = 1 if args.smoke else None
    out = args.out or str(ROOT / "bench" / "results" /
                          ("demand_forecast_refit.txt" if args.refit_daily else "demand_forecast.txt"))
    run = evaluate_refit if args.refit_daily else evaluate
    rows: list[list[str]] = []
    for path in sorted((data / "nab").glob("*.npz"))[:take]:
        with np.load(path) as z:
            y = np.concatenate([z["train"][:, 0], z["test"][:, 0]]).astype(np.float64)
        rows += run(f"nab/{path.stem}", y, 300.0, len(y) // 2, (1.0, 2.0))
    for path in sorted((data / "smd").glob("*.npz"))[:take]:
        with np.load(path) as z:
            train, test = z["train"].astype(np.float64), z["test"].astype(np.float64)
        ac = [day_autocorr(train[:, j], 1440) for j in range(train.shape[1])]
        for j in sorted(np.argsort(ac)[::-1][:2].tolist()):
            y = np.concatenate([train[:, j], test[:, j]])
            rows += run(f"smd/{path.stem}/m{j}", y, 60.0, len(train), (1.0, 2.0))
    head = ["series", "horizon", "MASE_vs_snaive", "cover80", "MAE", "MAE_snaive", "season",
            "gamma", "alpha", "phi", "choice", "w_model", "naive", "points"]
    if args.refit_daily:
        head = ["series", "horizon", "MASE_vs_snaive", "cover80", "MAE", "MAE_snaive", "fits", "choices",
                "points"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        (f"# demand forecast vs seasonal naive{', refitted daily' if args.refit_daily else ''}, "
         f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
         f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
         f"python {platform.python_version()})"),
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for hz in ("1h", "2h"):
        vals = [float(r[2]) for r in rows if r[1] == hz and r[2] != "n/a"]
        cov = [float(r[3]) for r in rows if r[1] == hz]
        lines.append(f"# {hz}: {sum(v < 1 for v in vals)}/{len(vals)} series with MASE < 1; "
                     f"mean MASE {np.mean(vals):.3f}, median {np.median(vals):.3f}, "
                     f"worst {max(vals):.3f}; 80% coverage median {np.median(cov):.2f}, "
                     f"mean {np.mean(cov):.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.smoke:
        print(f"smoke run: {out} left as it was")
        return 0
    Path(out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
